"""Verbosity of the libraries lightune drives, in one place: the CLI, compare's cell processes and model loading
all hide the same chatter."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings


def quiet_libraries() -> None:
    """Before the heavy imports: transformers logs errors only, tokenizers stays single-threaded, no warnings."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")


def silence_library_output(datasets_too: bool = True) -> None:
    """Hide datasets' and transformers' own progress bars and chatter (imports them: call after cheap checks;
    prediction and serving, which never read datasets, pass datasets_too=False)."""
    if datasets_too:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    import transformers

    transformers.utils.logging.disable_progress_bar()


def progress_bars(requested: bool = True) -> bool:
    """Whether the command line shows lightune's progress bars: when asked for and standard error is a terminal.
    Piped or redirected, a bar's redraws (carriage returns, and the cursor-up escapes `[A` of nested bars)
    would be left in the log as lines of their own."""
    return requested and sys.stderr.isatty()


@contextlib.contextmanager
def quiet_model_loading():
    """While a finished run's model loads for prediction (lightune.predict, Classifier): no 'Loading weights' bar
    and no library warnings (peft reads transformers' deprecated is_gradient_checkpointing, a FutureWarning).
    Both are put back as they were after, so a program using lightune keeps its own settings."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def quiet_transformers() -> None:
    """Hide the 'newly initialized classifier' load report: the head is trained on purpose."""
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
