"""The one exception the training and validation scripts turn into a clear message and a non-zero exit."""

EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Bad user input (arguments, data, checkpoints, output folders), reported without a traceback.

    Raised before anything is written wherever the problem can be detected up front, so a rejected command leaves
    the file system as it found it.
    """


def describe(error: BaseException) -> str:
    """An error's message without the worker traceback DataLoader wraps around errors raised in its workers."""
    text = str(error).strip()
    if 'Original Traceback' in text:
        last = text.splitlines()[-1]
        text = last.split(': ', 1)[1] if ': ' in last else last
    return text
