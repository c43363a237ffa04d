"""Tenants' data keys: made on first use, wrapped by the master key, cached unwrapped for the process's life.

Data keys never change (rotating the master key only re-wraps them), so a running process's cache stays valid
through a rotation; a process that needs a key it has not unwrapped yet reads the wrapped key from the database
again and asks the provider, which re-reads the key file.
"""

from __future__ import annotations

import base64
import os
import threading
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from adaptery.db import models as m
from adaptery.db.session import Database
from adaptery.storage.crypto import (
    DataKey,
    KeyProvider,
    LocalKeyProvider,
    TamperedError,
    _decode_key,
    _seal,
    client_secret_context,
    key_id,
    new_master_key_text,
    wrap_context,
    write_key_file,
)


class Keyring:
    def __init__(self, db: Database, provider: KeyProvider) -> None:
        self.db = db
        self.provider = provider
        self._cache: dict[str, DataKey] = {}
        self._lock = threading.Lock()

    def data_key(self, tenant_id: str) -> DataKey:
        cached = self._cache.get(tenant_id)
        if cached is not None:
            return cached
        with self._lock:
            if tenant_id not in self._cache:
                self._cache[tenant_id] = self._load_or_create(tenant_id)
            return self._cache[tenant_id]

    def _load_or_create(self, tenant_id: str) -> DataKey:
        for _ in range(2):
            with self.db.system() as s:
                row = s.get(m.TenantKey, tenant_id)
                if row is not None:
                    key = self.provider.unwrap(
                        row.master_key_id, base64.b64decode(row.wrapped), wrap_context(tenant_id, row.key_id)
                    )
                    data_key = DataKey(key)
                    if data_key.id != row.key_id:
                        raise TamperedError(f"tenant {tenant_id}'s data key does not match its id")
                    return data_key
            fresh = DataKey(os.urandom(32))
            master_id, wrapped = self.provider.wrap(fresh.key, wrap_context(tenant_id, fresh.id))
            try:
                with self.db.system() as s:
                    s.add(
                        m.TenantKey(
                            tenant_id=tenant_id,
                            key_id=fresh.id,
                            master_key_id=master_id,
                            wrapped=base64.b64encode(wrapped).decode(),
                        )
                    )
                return fresh
            except IntegrityError:
                continue  # another process made this tenant's key first: use theirs
        raise RuntimeError(f"could not load the data key of tenant {tenant_id}")


@dataclass(frozen=True)
class Rotation:
    old_key_id: str
    new_key_id: str
    rewrapped: int
    new_key_text: str | None  # only for keys from the environment: the operator must store it


def _rewrap_all(db: Database, provider: KeyProvider, new_key: bytes) -> int:
    new_id = key_id(new_key)
    count = 0
    with db.system() as s:
        rows = s.scalars(select(m.TenantKey).where(m.TenantKey.master_key_id != new_id).with_for_update()).all()
        for row in rows:
            context = wrap_context(row.tenant_id, row.key_id)
            data_key = provider.unwrap(row.master_key_id, base64.b64decode(row.wrapped), context)
            row.wrapped = base64.b64encode(_seal(new_key, data_key, context)).decode()
            row.master_key_id = new_id
            row.rewrapped_at = m.now()
            count += 1
        # identity providers' client secrets are sealed under the master key too (services.sso)
        providers = s.scalars(
            select(m.IdentityProvider)
            .where(m.IdentityProvider.secret_sealed.is_not(None), m.IdentityProvider.secret_key_id != new_id)
            .with_for_update()
        ).all()
        for provider_row in providers:
            context = client_secret_context(provider_row.id)
            secret = provider.unwrap(provider_row.secret_key_id, base64.b64decode(provider_row.secret_sealed), context)
            provider_row.secret_sealed = base64.b64encode(_seal(new_key, secret, context)).decode()
            provider_row.secret_key_id = new_id
    return count


def rotate_master_key(db: Database, provider: LocalKeyProvider, new_key_text: str | None = None) -> Rotation:
    """Re-wrap every tenant's data key under a new master key; no blob or value is re-encrypted.

    Key file: the new key is first written beside the old one (`<file>.new`, which running servers read and
    wrap new tenants' keys under), the data keys are re-wrapped in one transaction, then the new file replaces
    the old one and a second pass catches any key a server wrapped under the old key meanwhile. Afterwards the
    old master key is not needed any more.
    Environment: the data keys are re-wrapped under `new_key_text` (made here if not given, and returned); the
    operator then sets `ADAPTERY_MASTER_KEY` to it (`new,old` during the change-over for servers still running).
    """
    if not provider.uses_environment and provider.pending_file.exists():
        # An interrupted rotation: servers may already have wrapped new tenants' keys under its key; finish it.
        new_key_text = provider.pending_file.read_text().strip()
        provider._load(create=False)
    old_id = provider.current_key_id
    if not provider.uses_environment:
        old_id = key_id(_decode_key(provider.key_file.read_text()))
    new_text = new_key_text or new_master_key_text()
    new_key = _decode_key(new_text)
    if key_id(new_key) == old_id:
        raise ValueError("the new master key is the current one")
    if provider.uses_environment:
        count = _rewrap_all(db, provider, new_key)
        return Rotation(old_id, key_id(new_key), count, new_text if new_key_text is None else None)
    if not provider.pending_file.exists():
        write_key_file(provider.pending_file, new_text)
    provider._load(create=False)  # this process, too, knows both keys now
    count = _rewrap_all(db, provider, new_key)  # if this fails, the next run resumes with the same new key
    os.replace(provider.pending_file, provider.key_file)
    count += _rewrap_all(db, provider, new_key)
    return Rotation(old_id, key_id(new_key), count, None)
