"""/api/arena: one prompt to two models of one base, answered blind side by side; a vote; a leaderboard."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from adaptery.api.deps import platform, principal
from adaptery.api.feedback import FeedbackObject, VerdictFields
from adaptery.api.openai.chat import ChatRequest, answer_chat
from adaptery.auth.principal import Principal
from adaptery.platform import Platform
from adaptery.services import arena, audit, feedback

router = APIRouter(prefix="/api/arena", tags=["arena"])


class BattleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(max_length=arena.MAX_PROMPT, description="the message both models answer")
    system: str = Field("", max_length=arena.MAX_PROMPT)
    base: str | None = Field(None, max_length=128, description="draw two models of this base (itself, its adapters)")
    models: list[str] | None = Field(None, description="or these two models, of one base")
    params: dict[str, Any] | None = Field(None, description="temperature, max_tokens, top_p")


class Vote(BaseModel):
    model_config = ConfigDict(extra="forbid")
    winner: Literal["a", "b", "tie"]


class BattleObject(BaseModel):
    id: str
    object: Literal["arena.battle"] = "arena.battle"
    base_model: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    answers: dict[str, str | None]
    winner: str | None
    models: dict[str, str] | None = Field(description="which model was on each side: only once the vote is in")
    created_at: int
    voted_at: int | None


class LeaderboardRow(BaseModel):
    model: str
    rating: float
    ci_low: float
    ci_high: float
    wins: int
    losses: int
    ties: int


class Leaderboard(BaseModel):
    object: Literal["arena.leaderboard"] = "arena.leaderboard"
    base_model: str
    votes: int
    method: str
    data: list[LeaderboardRow]


@router.post("/battles", status_code=201)
def create_battle(
    body: BattleRequest, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> BattleObject:
    key = p.keyring.data_key(who.tenant_id)
    with p.db.tenant(who.tenant_id) as s:
        battle = arena.create_battle(
            s, key, who, prompt=body.prompt, system=body.system, base=body.base, pair=body.models, params=body.params
        )
        audit.record(s, who, "arena.battle", target=battle.id, detail={"base": battle.base_model})
        return BattleObject(**arena.battle_view(key, battle))


@router.get("/battles/{battle_id}")
def get_battle(battle_id: str, who: Principal = Depends(principal), p: Platform = Depends(platform)) -> BattleObject:
    key = p.keyring.data_key(who.tenant_id)
    with p.db.tenant(who.tenant_id) as s:
        return BattleObject(**arena.battle_view(key, arena.get_battle(s, who, battle_id)))


@router.post("/battles/{battle_id}/answers/{side}", response_model=None)
async def answer_side(
    battle_id: str, side: str, request: Request, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> StreamingResponse | dict:
    """Side a's or b's answer, streamed as chat completion chunks whose model is only `model-a` / `model-b`."""
    key = p.keyring.data_key(who.tenant_id)

    def ask() -> arena.SideRequest:
        with p.db.tenant(who.tenant_id) as s:
            asked = arena.side_request(s, key, who, battle_id, side)
            audit.record(s, who, "arena.answer", target=battle_id, detail={"side": side})
            return asked

    asked = await run_in_threadpool(ask)
    body = ChatRequest(
        model=asked.model, messages=asked.messages, stream=True, stream_options={"include_usage": True}, **asked.params
    )

    def keep(completion_id: str, answered_by: str, texts: list[str]) -> None:
        arena.record_answer(
            p.db, key, who, battle_id, side, texts[0], completion_id=completion_id, answered_by=answered_by
        )

    return await answer_chat(p, who, body, request, on_answer=keep, shown_model=f"model-{side}")


@router.post("/battles/{battle_id}/answers/{side}/feedback")
def rate_answer(
    battle_id: str,
    side: str,
    body: VerdictFields,
    who: Principal = Depends(principal),
    p: Platform = Depends(platform),
) -> FeedbackObject:
    """Thumbs up/down (with a reason) or a correction on one side's answer, after the vote."""
    key = p.keyring.data_key(who.tenant_id)
    with p.db.tenant(who.tenant_id) as s:
        row = arena.rate_answer(s, key, who, battle_id, side, body.verdict())
        audit.record(s, who, "feedback.give", target=row.id, detail={"battle": battle_id, "side": side})
        return FeedbackObject(**feedback.feedback_view(key, row))


@router.post("/battles/{battle_id}/vote")
def vote(
    battle_id: str, body: Vote, who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> BattleObject:
    key = p.keyring.data_key(who.tenant_id)
    with p.db.tenant(who.tenant_id) as s:
        battle = arena.vote(s, who, battle_id, body.winner)
        audit.record(s, who, "arena.vote", target=battle.id, detail={"winner": body.winner})
        return BattleObject(**arena.battle_view(key, battle))


@router.get("/leaderboard")
def leaderboard(
    base: Annotated[str, Query(max_length=128)], who: Principal = Depends(principal), p: Platform = Depends(platform)
) -> Leaderboard:
    with p.db.tenant(who.tenant_id) as s:
        return Leaderboard(**arena.leaderboard(s, who, base))
