import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

# transformers' backward-compatibility shims for renamed arguments (5.24: `past_key_values` -> `cache`) announce
# themselves through the `transformers` logger (output classes, `.past_key_values` reads) or a FutureWarning
# (`deprecate_kwarg`, made an error for our code in setup.cfg's filterwarnings). The suite must never lean on them.


class _ShimRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "past_key_values" in message or "cache_params" in message:
            self.messages.append(message)


@pytest.fixture(autouse=True)
def no_backward_compatibility_shims():
    """Fail a test whose code path used transformers' `past_key_values` compatibility shims."""
    recorder = _ShimRecorder()
    logger = logging.getLogger("transformers")
    logger.addHandler(recorder)
    try:
        yield
    finally:
        logger.removeHandler(recorder)
    assert not recorder.messages, f"transformers' backward-compatibility shims were used: {recorder.messages}"
