"""Glue shared by the thin Typer scripts in pipeline/: logging and error handling."""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable, TypeVar

from hrkd.errors import HRKDError

F = TypeVar("F", bound=Callable[..., object])
log = logging.getLogger("hrkd")


def setup_logging(level: str | None = None) -> None:
    level = level or os.environ.get("HRKD_LOG_LEVEL", "INFO")
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # Third-party chatter (HF hub retries, DVC internals) drowns our progress lines.
    for noisy in ("urllib3", "filelock", "fsspec", "httpx", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # transformers draws a bar for every save_pretrained; ours are the only ones worth an ETA.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_warning()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


def stage(func: F) -> F:
    """Wrap a stage entry point: set up logging, and turn input errors into one line + exit 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        setup_logging()
        try:
            return func(*args, **kwargs)
        except HRKDError as err:
            sys.stderr.write(f"error: {err}\n")
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            sys.stderr.write("interrupted: outputs were not replaced; rerun the stage to resume\n")
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]
