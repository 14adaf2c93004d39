"""Answer extraction and scoring; lives in :mod:`moelora_lit.eval.answers` (this path is kept for users)."""

from moelora_lit.eval.answers import *  # noqa: F401,F403
from moelora_lit.eval.answers import extract_answer, is_correct  # noqa: F401
