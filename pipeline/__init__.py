"""pipeline."""

import os

VERBOSE_ENV = "LOCALCAP_VERBOSE"  # `localcap --verbose` sets it; Ray workers and flow runs inherit it


def verbose() -> bool:
    """Whether Ray's own process lines and the tracebacks of remote failures are to be shown."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")
