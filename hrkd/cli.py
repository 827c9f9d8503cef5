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

        from huggingface_hub.utils import disable_progress_bars

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_warning()
        # The variable above only reaches a hub that is imported after it (not a warm child's).
        disable_progress_bars()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


def stage(func: F) -> F:
    """Wrap a stage entry point: set up logging, and turn input errors into one line + exit 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            if func.__module__ == "__main__":  # run as a script (a DVC stage), not called from a test
                from hrkd import warm

                status = warm.delegate()
                if status is not None:  # a warm child ran the whole script (hrkd/warm.py)
                    warm.exit_like(status)
            setup_logging()
            return func(*args, **kwargs)
        except HRKDError as err:
            sys.stderr.write(f"error: {err}\n")
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            sys.stderr.write("interrupted: outputs were not replaced; rerun the stage to resume\n")
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]
