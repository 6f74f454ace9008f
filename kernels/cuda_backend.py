"""PLACEHOLDER until csrc/ lands."""


def unavailable_reason():
    return "the csrc/ extension is not written yet"
