"""User-facing errors: one line that names the problem and the fix (DESIGN §6)."""


class PPVAEError(Exception):
    """A problem with the user's input, configuration or files.

    The CLI prints the message on one line and exits with code 2; library callers get the exception.
    """


class ContractError(PPVAEError):
    """A model/guide pair breaks the contract of DESIGN §1 (data plate, site names, shapes)."""


class DivergenceError(PPVAEError):
    """Training produced a non-finite loss."""
