"""What a failed request is told, by kind. The glue maps kinds to its protocol's codes (Triton:
INVALID_ARG for ValueError, UNAVAILABLE, INTERNAL)."""


class EngineUnavailable(RuntimeError):
    """The engine cannot take the request now: shutting down, unhealthy, or overloaded. Retry later
    (or elsewhere)."""


# RequestOutput.error_kind: why a request that was accepted ended with an error.
INTERNAL = "internal"          # our bug, or a step that failed
UNAVAILABLE = "unavailable"    # overload (queue timeout) or the request's own deadline passed
