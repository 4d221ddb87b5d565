"""Verbosity of the libraries lightune drives, in one place: the CLI, compare's cell processes and model loading
all hide the same chatter."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Before the heavy imports: transformers logs errors only, tokenizers stays single-threaded, no warnings."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")


def silence_library_output() -> None:
    """Hide datasets' and transformers' own progress bars and chatter (imports them: call after cheap checks)."""
    import datasets

    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def quiet_transformers() -> None:
    """Hide the 'newly initialized classifier' load report: the head is trained on purpose."""
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
