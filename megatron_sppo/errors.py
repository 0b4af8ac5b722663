"""User-facing errors: one line that names the problem and how to fix it."""


class UserError(Exception):
    """Bad input (config, checkpoint, flags). The CLI prints ``error: <message>`` and exits 2.

    The message must fit on one line and say what to do, e.g.
    ``--tp 3 does not divide num_attention_heads=16: use a --tp that divides 16``.
    """
