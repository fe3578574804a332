"""Where an object (a pipeline or a denoiser) records the guidance session attached to it: one attribute, one
session, for every kind of session (hooks on denoisers, or a swapped guider)."""
from __future__ import annotations

from typing import Any, Optional

SESSION_ATTR = "_stg_ext_session"


def session_of(obj: Any) -> Optional[Any]:
    return getattr(obj, SESSION_ATTR, None)


def record(obj: Any, session: Any) -> None:
    setattr(obj, SESSION_ATTR, session)


def forget(obj: Any, session: Any) -> None:
    """Drops the record if it is `session`'s (a later session may have replaced it)."""
    if getattr(obj, SESSION_ATTR, None) is session:
        delattr(obj, SESSION_ATTR)
