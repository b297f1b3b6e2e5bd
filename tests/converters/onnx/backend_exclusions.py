"""Backend-suite cases jaxinfer does not run, each with the reason (regex -> why)."""

from __future__ import annotations

EXCLUDED: dict[str, str] = {
}
