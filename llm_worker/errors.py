"""The error a job's input can cause, shared by the modules that check input (schema, prompts,
adapters) without importing one another."""


class InputError(ValueError):
    """The job input broke a rule; the message names the field and the rule."""
