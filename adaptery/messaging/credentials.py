"""Agent credentials on the wire: the `agent-…:secret` token an agent is started with, and the bcrypt form
nats-server checks (the server's configuration is generated from the database and never holds a usable secret).
Nothing here touches the database: the agent side parses tokens, the server side hashes them."""

from __future__ import annotations

from dataclasses import dataclass

import bcrypt

BCRYPT_ROUNDS = 10


@dataclass(frozen=True)
class AgentCredentials:
    agent_id: str
    name: str
    secret: str

    @property
    def token(self) -> str:
        """What `adaptery agent --credentials` takes: the NATS user and password in one string."""
        return f"{self.agent_id}:{self.secret}"


def parse_token(token: str) -> tuple[str, str]:
    agent_id, sep, secret = token.strip().partition(":")
    if not sep or not agent_id.startswith("agent-") or not secret:
        raise ValueError("agent credentials look like 'agent-…:secret' (printed once by `adaptery agents create`)")
    return agent_id, secret


def hash_secret(secret: str, rounds: int = BCRYPT_ROUNDS) -> str:
    """bcrypt in the $2a$ form nats-server accepts. `rounds` may be bcrypt's least (4) for a secret drawn at random
    by the platform itself: the cost slows guessing of human passwords, and 240 random bits are not guessed."""
    return bcrypt.hashpw(secret.encode(), bcrypt.gensalt(rounds=rounds, prefix=b"2a")).decode()
