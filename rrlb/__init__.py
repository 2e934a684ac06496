"""
rrlb: a round-robin HTTP load balancer built on Twisted.
"""

__version__ = "0.1.0"
