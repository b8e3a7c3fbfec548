"""Who is calling: the result of authentication, and what it may use."""

from __future__ import annotations

import uuid
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: a chatgate user or a Supabase user (by its `sub`)."""

    user_id: uuid.UUID
    name: str = ""
    is_admin: bool = False

    def may_use(self, owner: uuid.UUID, sharing: str) -> bool:
        """Owners and admins use any model; anyone signed in uses a model that is not private."""
        return self.is_admin or owner == self.user_id or sharing != "private"

    def may_manage(self, owner: uuid.UUID) -> bool:
        """Only the owner (or an admin) changes or deletes a model."""
        return self.is_admin or owner == self.user_id
