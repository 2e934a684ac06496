"""
C{--workers N}: one main process and N worker processes.

The main process binds every listener (or takes them from systemd), stops
reading from them and hands them to the workers, which adopt them
(C{reactor.adoptStreamPort}; TLS and the PROXY header are wrapped in the
worker) and serve all the traffic. The main process serves none: its
control side (L{rrlb.service.ControlService}) owns the configuration, the
health checkers, DNS discovery, the admin endpoint and systemd's
notifications, around a stand-in for the traffic side
(L{rrlb.workers.main.WorkersTraffic}) that starts, restarts and stops the
workers and forwards to them. Each worker composes its own traffic side,
without a control side.

  - L{rrlb.workers.wire}: the AMP messages between the processes;
  - L{rrlb.workers.main}: the main process's traffic side;
  - L{rrlb.workers.supervisor}: the worker processes, started, restarted
    and stopped, and what they are told and asked;
  - L{rrlb.workers.sockets}: the listening sockets the workers share;
  - L{rrlb.workers.totals}: the workers' counts, added up for the admin
    endpoint and the charts;
  - L{rrlb.workers.child}: a worker process around its own
    L{rrlb.traffic.Traffic}.

So the request path of a worker is the single-process one: routes pick one
of its own L{rrlb.pool.Pool}s, whose health state the main process sets,
and it counts in its own L{rrlb.metrics.Metrics}, which the main process
reads and adds up (by pool and node) only when asked.
"""
