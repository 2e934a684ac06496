"""
The twistd dropin for rrlb: data only, so that every C{twistd --help} stays
cheap. The service tree is built in L{rrlb.tap.makeService}.
"""

from twisted.application.service import ServiceMaker

rrlb = ServiceMaker(
    "rrlb",
    "rrlb.tap",
    "A round-robin HTTP load balancer with active and passive health checks.",
    "rrlb",
)
