"""The base of every plan model: frozen, strict, serialisable."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class PlanModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
