"""Throw-away backends for dispatch tests: they compute with the torch backend and record
every call. Register them with ``gla_testing.temporary_backend`` so they never leak."""

from glakernels._dispatch import registry


class RecordingBackend(type(registry.get("torch"))):
    description = "test double"

    def __init__(self, name, *, device_types=None, auto_priority=None, unavailable=(), **declarations):
        self.name = name
        self.calls = []
        if device_types is not None:
            self.device_types = frozenset(device_types)
        self.auto_priority = auto_priority or {}
        self._unavailable = list(unavailable)
        for key, value in declarations.items():
            if not hasattr(self, key):
                raise AttributeError(key)
            setattr(self, key, value)

    def unavailable_reasons(self):
        return self._unavailable

    def forward(self, inputs):
        self.calls.append(("forward", inputs.spec))
        return super().forward(inputs)

    def backward(self, inputs, grad_output, grad_final_state):
        self.calls.append(("backward", inputs.spec))
        return super().backward(inputs, grad_output, grad_final_state)
