"""tmrl's local stack launcher (see :mod:`tmrl_stack.launcher`)."""

from tmrl_stack.launcher import LocalStack, StackError, StackPorts, free_ports, raise_on_sigterm, wait_until

__all__ = ["LocalStack", "StackError", "StackPorts", "free_ports", "raise_on_sigterm", "wait_until"]
