"""The arena: one prompt answered blind by two models of one base, a person's vote, and a leaderboard.

A battle is its person's: they stream both answers (the sides do not name their models), vote a, b or tie,
and only then see which model was which. Votes are feedback: a battle is made only when the tenant's
policy collects feedback (`services.feedback`), and the votes the leaderboard counts are those its reader
may read under that policy.

The leaderboard fits a Bradley–Terry model to the votes (choix's ILSR, a tie counted as half a win each way,
a ridge prior so a handful of votes moves ratings a little and a model that never lost stays finite), on the
Elo scale (1000 + 400·log10 of the strength), with a 95% interval from a seeded bootstrap over the battles.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from adaptery.auth.principal import Principal
from adaptery.db import models as m
from adaptery.db.ids import new_id
from adaptery.db.session import Database
from adaptery.services import conversations, feedback, models
from adaptery.services.errors import Conflict, InvalidRequest, NotFound
from adaptery.storage.crypto import DataKey

SIDES = ("a", "b")
WINNERS = ("a", "b", "tie")
MAX_PROMPT = 100_000
BOOTSTRAP_ROUNDS = 200
# choix's alpha, a ridge prior: one vote moves two models ±95 points (not ±400 as with 0.01), an unbeaten model
# stays finite, and 60 votes at 2:1 still give 116 points of the exact 120 apart
RIDGE = 0.5
ELO_SCALE = 400 / math.log(10)


def create_battle(
    session: Session,
    key: DataKey,
    who: Principal,
    *,
    prompt: str,
    system: str = "",
    base: str | None = None,
    pair: list[str] | None = None,
    params: dict[str, Any] | None = None,
) -> m.ArenaBattle:
    """Two models (the `pair` asked for, or two drawn from `base` and the adapters on it the caller may use),
    placed on the sides at random."""
    feedback.require_collection(feedback.get_policy(session, who.tenant_id))
    if not prompt.strip():
        raise InvalidRequest("prompt is empty: type the message both models answer", param="prompt")
    if len(prompt) > MAX_PROMPT or len(system) > MAX_PROMPT:
        raise InvalidRequest(f"prompt and system must be at most {MAX_PROMPT} characters", param="prompt")
    checked = conversations.check_params(params or {})
    if pair is not None:
        if len(pair) != 2 or pair[0] == pair[1]:
            raise InvalidRequest("models must name two different models", param="models")
        refs = [models.get_model(session, model_id, param="models", viewer=who) for model_id in pair]
        if refs[0].base.id != refs[1].base.id:
            raise InvalidRequest("the two models must share a base: the leaderboard is per base", param="models")
        chosen, base_id = [ref.id for ref in refs], refs[0].base.id
    else:
        if not base:
            raise InvalidRequest("name a base model (base) or two models (models)", param="base")
        base_ref = models.get_model(session, base, param="base", viewer=who)
        if base_ref.adapter is not None:
            raise InvalidRequest(f"'{base}' is an adapter; name its base model", param="base")
        candidates = [ref.id for ref in models.list_models(session, viewer=who) if ref.base.id == base_ref.id]
        if len(candidates) < 2:
            raise Conflict(
                f"The arena needs two models of '{base}': you may use only the base itself. Fine-tune or import "
                "an adapter on it first.",
                param="base",
                code="arena_needs_two_models",
            )
        chosen, base_id = secrets.SystemRandom().sample(candidates, 2), base_ref.id
    if secrets.randbelow(2):
        chosen.reverse()
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    battle_id = new_id("battle_")
    battle = m.ArenaBattle(
        id=battle_id,
        user_id=who.user_id,
        base_model=base_id,
        model_a=chosen[0],
        model_b=chosen[1],
        prompt=feedback.seal(key, messages, "arena_battles.prompt", battle_id),
        params=checked,
    )
    session.add(battle)
    session.flush()
    return battle


def get_battle(session: Session, who: Principal, battle_id: str) -> m.ArenaBattle:
    """The caller's own battle; anyone else's (or another tenant's) is a 404."""
    battle = session.scalar(
        select(m.ArenaBattle).where(m.ArenaBattle.id == battle_id, m.ArenaBattle.user_id == who.user_id)
    )
    if battle is None:
        raise NotFound(f"No battle '{battle_id}'.", param="battle_id", code="battle_not_found")
    return battle


@dataclass(frozen=True)
class SideRequest:
    model: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]


def side_request(session: Session, key: DataKey, who: Principal, battle_id: str, side: str) -> SideRequest:
    """What to ask the model on `side`: once per side (a second answer would let a person shop for one)."""
    if side not in SIDES:
        raise InvalidRequest("side must be a or b", param="side")
    battle = get_battle(session, who, battle_id)
    if getattr(battle, f"answer_{side}") is not None:
        raise Conflict(f"Side {side} of this battle has answered already.", param="side", code="already_answered")
    messages = feedback.unseal(key, battle.prompt, "arena_battles.prompt", battle.id)
    return SideRequest(getattr(battle, f"model_{side}"), messages, dict(battle.params))


def record_answer(
    db: Database,
    key: DataKey,
    who: Principal,
    battle_id: str,
    side: str,
    text: str,
    *,
    completion_id: str | None = None,
    answered_by: str | None = None,
) -> None:
    """Keep a side's answer with its completion id and the model that answered it (a stable name's version: a
    canary's wins and losses are counted apart from its current version's)."""
    with db.tenant(who.tenant_id) as s:
        battle = get_battle(s, who, battle_id)
        column = f"answer_{side}"
        if getattr(battle, column) is None:
            setattr(battle, column, feedback.seal(key, text, f"arena_battles.{column}", battle.id))
            setattr(battle, f"completion_{side}", completion_id)
            setattr(battle, f"answered_{side}", answered_by)


def rate_answer(
    session: Session, key: DataKey, who: Principal, battle_id: str, side: str, verdict: feedback.Verdict
) -> m.Feedback:
    """Thumbs (and a correction) on one side's answer, once the vote is in: a rating names its model, so before
    the vote it would unblind the battle. Counted for the model that answered (a name's version), like a chat's."""
    verdict.check()
    if side not in SIDES:
        raise InvalidRequest("side must be a or b", param="side")
    battle = get_battle(session, who, battle_id)
    feedback.require_collection(feedback.get_policy(session, who.tenant_id))
    if battle.winner is None:
        raise Conflict("Rate the answers after your vote: a rating names the model.", param="side",
                       code="vote_first")  # fmt: skip
    asked = getattr(battle, f"model_{side}")
    models.get_model(session, asked, viewer=who, checkpoints=True)  # still one its rater may use
    answered, completion = getattr(battle, f"answered_{side}") or asked, getattr(battle, f"completion_{side}")
    # one rating per side: by its completion (both sides may be one adapter: a name and its current version)
    same = m.Feedback.completion_id == completion if completion else m.Feedback.model == answered
    existing = session.scalar(
        select(m.Feedback).where(m.Feedback.battle_id == battle.id, same, m.Feedback.user_id == who.user_id)
    )
    prompt = feedback.unseal(key, battle.prompt, "arena_battles.prompt", battle.id)
    answer = feedback.unseal(key, getattr(battle, f"answer_{side}"), f"arena_battles.answer_{side}", battle.id)
    lineage = {"battle_id": battle.id, "completion_id": completion}
    return feedback.upsert(
        session, key, who, existing, verdict, model=answered, prompt=prompt, answer=answer, lineage=lineage
    )


def vote(session: Session, who: Principal, battle_id: str, winner: str) -> m.ArenaBattle:
    if winner not in WINNERS:
        raise InvalidRequest("winner must be a, b or tie", param="winner")
    battle = get_battle(session, who, battle_id)
    feedback.require_collection(feedback.get_policy(session, who.tenant_id))  # like a rating: nothing kept when off
    if battle.winner is not None:
        raise Conflict("This battle has its vote already.", param="winner", code="already_voted")
    if battle.answer_a is None or battle.answer_b is None:
        raise Conflict("Both answers must be complete before the vote.", param="winner", code="answers_pending")
    battle.winner, battle.voted_at = winner, time.time()
    session.flush()
    return battle


def battle_view(key: DataKey, battle: m.ArenaBattle) -> dict[str, Any]:
    """The battle as its person sees it: the models are named only once the vote is in."""
    answers = {
        side: feedback.unseal(key, getattr(battle, f"answer_{side}"), f"arena_battles.answer_{side}", battle.id)
        for side in SIDES
    }
    voted = battle.winner is not None
    return {
        "id": battle.id,
        "object": "arena.battle",
        "base_model": battle.base_model,
        "messages": feedback.unseal(key, battle.prompt, "arena_battles.prompt", battle.id),
        "params": battle.params,
        "answers": answers,
        "winner": battle.winner,
        "models": {"a": battle.model_a, "b": battle.model_b} if voted else None,
        "created_at": int(battle.created_at),
        "voted_at": int(battle.voted_at) if battle.voted_at else None,
    }


# --- the leaderboard -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rating:
    model: str
    rating: float
    low: float
    high: float
    wins: int
    losses: int
    ties: int


def _games(battles: list[tuple[int, int, str]]) -> list[tuple[int, int]]:
    """(winner, loser) pairs: a decisive vote twice, a tie once each way (half a win to each side)."""
    games = []
    for a, b, winner in battles:
        if winner == "tie":
            games += [(a, b), (b, a)]
        else:
            games += [(a, b), (a, b)] if winner == "a" else [(b, a), (b, a)]
    return games


def _fit(n_models: int, battles: list[tuple[int, int, str]]) -> np.ndarray:
    import choix  # here: it imports SciPy's optimizers (0.8 s of every server start), used only for ratings

    return choix.ilsr_pairwise(n_models, _games(battles), alpha=RIDGE) * ELO_SCALE + 1000


def bradley_terry(
    names: list[str], battles: list[tuple[int, int, str]], *, rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0
) -> list[Rating]:
    """Ratings of `names` from battles (index of a, index of b, winner a/b/tie), best first, with a 95% interval
    from `rounds` bootstrap resamples of the battles (seeded: the same votes give the same board)."""
    if not battles:
        return []
    ratings = _fit(len(names), battles)
    rng = np.random.default_rng(seed)
    samples = np.array(
        [_fit(len(names), [battles[i] for i in rng.integers(0, len(battles), len(battles))]) for _ in range(rounds)]
    )
    low, high = np.percentile(samples, [2.5, 97.5], axis=0)
    board = []
    for index, name in enumerate(names):
        wins = sum(1 for a, b, w in battles if (w == "a" and a == index) or (w == "b" and b == index))
        losses = sum(1 for a, b, w in battles if (w == "b" and a == index) or (w == "a" and b == index))
        ties = sum(1 for a, b, w in battles if w == "tie" and index in (a, b))
        board.append(Rating(name, float(ratings[index]), float(low[index]), float(high[index]), wins, losses, ties))
    return sorted(board, key=lambda r: -r.rating)


def leaderboard(session: Session, who: Principal, base: str) -> dict[str, Any]:
    """The base's board from the votes the caller may read; models the caller may not see are counted in the
    fit but not shown."""
    base_ref = models.get_model(session, base, param="base", viewer=who)
    query = select(m.ArenaBattle).where(m.ArenaBattle.base_model == base_ref.id, m.ArenaBattle.winner.is_not(None))
    policy = feedback.get_policy(session, who.tenant_id)
    condition = feedback.readable(who, policy, m.ArenaBattle.user_id, m.ArenaBattle.model_a, m.ArenaBattle.model_b)
    if condition is not None:
        query = query.where(condition)
    rows = list(session.scalars(query.order_by(m.ArenaBattle.voted_at)))
    names = sorted({x for row in rows for x in (row.model_a, row.model_b)})
    index = {name: i for i, name in enumerate(names)}
    battles = [(index[row.model_a], index[row.model_b], row.winner) for row in rows]
    visible = {ref.id for ref in models.list_models(session, viewer=who)}
    board = [r for r in bradley_terry(names, battles) if r.model in visible]
    return {
        "object": "arena.leaderboard",
        "base_model": base_ref.id,
        "votes": len(rows),
        "method": f"Bradley–Terry (choix ILSR), Elo scale, 95% bootstrap interval over {BOOTSTRAP_ROUNDS} resamples",
        "data": [
            {
                "model": r.model,
                "rating": round(r.rating, 1),
                "ci_low": round(r.low, 1),
                "ci_high": round(r.high, 1),
                "wins": r.wins,
                "losses": r.losses,
                "ties": r.ties,
            }
            for r in board
        ],
    }
