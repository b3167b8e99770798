"""Request and response bodies. Limits come from Settings, so the models are built per app."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    StringConstraints,
    model_validator,
)

from index_builder.bundle import AGGREGATE, Merge, Mode

from .settings import Settings

INSPECT_MAX_N = 100       # the page shows K + 4 lists of n: more is not for reading


class Item(BaseModel):
    """One candidate: its external id and score (and, per interest, which one found it)."""
    item_id: str
    score: float = Field(description="On the scale `score_kind` names: an inner product with the "
                                     "query vector (about -10 to 10), or a training click count.")
    interest: int | None = Field(None, description="per_interest: the interest that retrieved it.")
    interest_scores: list[float] | None = Field(
        None, description="per_interest with include_interests: its score under each interest.")


class Recommendation(BaseModel):
    """The answer of `POST /recommend`."""
    user_id: str
    version: str = Field(description="The bundle version that answered.")
    arm: str = Field(description="The user's arm: `control` (the served bundle), or the "
                                 "candidate version it was assigned (SINE_ARMS).")
    mode: Mode = Field(description=(
        "The search that answered: the request's, else the service's or the bundle's default."))
    merge: Merge | None = Field(None, description="per_interest: the merge of the K lists; "
                                                  "null for aggregate.")
    fallback: Literal["cold_start", "history_unavailable"] | None = Field(
        description="null when personalized; else why popular items were served.")
    score_kind: Literal["inner_product", "popularity"] = Field(
        description="What `score` measures: `inner_product` (personalized answers) or "
                    "`popularity`, the item's training click count (fallbacks). The two scales "
                    "differ by orders of magnitude: never rank them against each other.")
    items: list[Item]
    interest_weights: list[float] | None = Field(
        None, description="include_interests: the K aggregation weights (Eq. 8).")


class BatchResponse(BaseModel):
    """The answer of `POST /recommend/batch`: one recommendation per user, in order."""
    results: list[Recommendation]


class EventResponse(BaseModel):
    """The answer of `POST /events`."""
    user_id: str
    history_length: int
    event_id: str = Field(description="The event's id: the client's, or one made for it.")
    duplicate: bool = Field(description="True when this event_id was recorded before: nothing "
                                        "was written again (a retry).")


class ReloadRequest(BaseModel):
    """The body of `POST /admin/reload`."""
    model_config = ConfigDict(extra="forbid")
    version: StrictStr | None = Field(None, description="A version under the bundle root; "
                                                        "omitted: whatever `current` names.")


class Shown(BaseModel):
    """An item as the inspector shows it."""
    item_id: str
    title: str | None = Field(description="The bundle's title for it, where the data had one.")
    score: float
    interest: int | None = Field(None, description="In a merged list: the interest that found it.")


class Click(BaseModel):
    """One click of the history the service read, newest first."""
    item_id: str
    title: str | None
    known: bool = Field(description="In the bundle's vocabulary (unknown clicks are dropped).")
    in_window: bool = Field(description="Among the n newest known clicks the encoder reads.")


class InterestView(BaseModel):
    """One of the K interests: its Eq. 7 weight and its own top items."""
    k: int
    weight: float
    items: list[Shown]


class Inspection(BaseModel):
    """The answer of `POST /admin/inspect`: what the service reads and retrieves for a user."""
    user_id: str
    version: str
    K: int = Field(description="Interests per user in this bundle.")
    n: int
    fallback: Literal["no_history", "cold_start", "history_unavailable"] | None = Field(
        description="Why nothing personal can be shown: no history in Redis, no click the bundle "
                    "knows, or Redis could not be read; null when personalized.")
    history: list[Click]
    interests: list[InterestView]
    aggregate: list[Shown] = Field(description="The Eq. 8 user vector's top n.")
    merges: dict[str, list[Shown]] = Field(description="Each merge of the K lists, by name.")
    popular: list[Shown] = Field(description="The fallback: the most clicked items in training.")


class InspectBody(BaseModel):
    """What `POST /admin/inspect` takes; `request_models` puts this app's limits on it."""
    user_id: str | int
    n: int = 10


class ArmsRequest(BaseModel):
    """The body of `PUT /admin/arms`: the whole layout, replacing the live one."""
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"arms": {"20261207T1200Z-ab12cd34": 0.1}, "shadow": "20261208T0300Z-ab12cd34",
         "shadow_rate": 0.1}]})
    arms: dict[StrictStr, float] = Field(default_factory=dict, description=(
        "Candidate versions under the bundle root and the share of users each answers (at most "
        "1 in all; the rest is control)."))
    shadow: StrictStr | None = Field(None, description="A version answering a sample off the "
                                                       "response path; null: none.")
    shadow_rate: float = Field(0.1, ge=0, le=1, description="The share the shadow answers.")


class ArmView(BaseModel):
    """One arm of the layout."""
    name: str
    weight: float
    status: Literal["serving", "refused"]
    reason: str | None = Field(description="Why it was refused (it takes no traffic).")


class ShadowView(BaseModel):
    """The shadow of the layout."""
    name: str
    rate: float
    status: Literal["serving", "refused"]
    reason: str | None


class ArmsLayout(BaseModel):
    """The live rollout layout (`GET` and `PUT /admin/arms`)."""
    arms: list[ArmView]
    shadow: ShadowView | None


class RecommendBody(BaseModel):
    """What `POST /recommend` takes; `request_models` puts this app's limits on it."""
    user_id: str | int
    n: int
    exclude_seen: bool = True
    mode: Mode | None = None
    merge: Merge | None = None
    include_interests: bool = False


class BatchBody(BaseModel):
    """What `POST /recommend/batch` takes; `request_models` puts this app's limits on it."""
    requests: list[RecommendBody]


class EventBody(BaseModel):
    """What `POST /events` takes; `request_models` puts this app's limits on it."""
    user_id: str | int
    item_id: str | int
    event_id: str | None = None


@dataclass(frozen=True)
class RequestModels:
    """The request bodies with one app's limits (`max_n`, `max_batch_users`, id lengths): the
    routes are typed with the bases above and registered with these."""
    recommend: type[RecommendBody]
    batch: type[BatchBody]
    event: type[EventBody]
    inspect: type[InspectBody]


def _default(setting: str, what: str) -> str:
    return (f"the bundle's {what} (its manifest's `serving`, chosen on validation at export)"
            if setting == "bundle" else f"`{setting}`")


def request_models(s: Settings) -> RequestModels:
    """The request bodies with this app's limits, each a subclass of its base."""
    UserStr = Annotated[StrictStr, StringConstraints(min_length=1, max_length=s.max_user_id_length)]
    ItemStr = Annotated[StrictStr, StringConstraints(min_length=1, max_length=s.max_item_id_length)]
    EventStr = Annotated[StrictStr, StringConstraints(min_length=1, max_length=128)]
    # an int's decimal string is held to the same length as a string id
    digits = s.max_user_id_length
    UserInt = Annotated[StrictInt, Field(ge=-(10 ** (digits - 1) - 1), le=10 ** digits - 1)]
    UserId = Annotated[UserStr | UserInt, Field(
        description=f"The user's id, at most {s.max_user_id_length} characters; an int is the "
                    f"same user as its decimal string.")]

    class RecommendRequest(RecommendBody):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"user_id": "1", "n": 10},
            {"user_id": 42, "n": 50, "mode": "per_interest", "include_interests": True},
            {"user_id": 42, "n": 50, "mode": "per_interest", "merge": "quota"}]})
        user_id: UserId
        n: StrictInt = Field(ge=1, le=s.max_n, description=f"How many items, 1 to {s.max_n}.")
        exclude_seen: StrictBool = Field(True, description="Drop items in the user's history.")
        mode: Mode | None = Field(None, description=(
            "`aggregate`: search with the Eq. 8 user vector; `per_interest`: search with each "
            "interest and merge the K lists. Omitted: `per_interest` where `merge` is given, "
            f"else {_default(s.default_mode, 'mode')} (SINE_DEFAULT_MODE)."))
        merge: Merge | None = Field(None, description=(
            "per_interest: how the K lists become one. `max`: by best raw score; `weighted`: by "
            "score + log of the interest's Eq. 7 weight; `quota`: each interest fills its "
            f"weight's share of n. Omitted: {_default(s.interest_merge, 'merge')} "
            "(SINE_INTEREST_MERGE)."))
        include_interests: StrictBool = Field(False, description=(
            "Return the aggregation weights; per_interest items also get their score under "
            "each interest."))

        @model_validator(mode="after")
        def _merge_needs_interests(self) -> RecommendRequest:
            if self.merge is not None and self.mode == AGGREGATE:
                raise ValueError("merge applies to mode=per_interest only")
            return self

    class BatchRequest(BatchBody):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"requests": [{"user_id": "1", "n": 10}, {"user_id": "2", "n": 10}]}]})
        requests: list[RecommendRequest] = Field(  # type: ignore[assignment]  # narrower items
            min_length=1, max_length=s.max_batch_users)

    class EventRequest(EventBody):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"user_id": "1", "item_id": "1193"},
            {"user_id": "1", "item_id": "1193", "event_id": "c0ffee-42"}]})
        user_id: UserId
        item_id: ItemStr | StrictInt = Field(description="The clicked item's external id.")
        event_id: EventStr | None = Field(None, description=(
            "Optional client id of this event: a retry with the same id (from the same user) is "
            "stored once."))

    class InspectRequest(InspectBody):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
            {"user_id": "1", "n": 10}]})
        user_id: UserId
        n: StrictInt = Field(10, ge=1, le=min(s.max_n, INSPECT_MAX_N),
                             description=f"Items per list, 1 to {min(s.max_n, INSPECT_MAX_N)}.")

    return RequestModels(RecommendRequest, BatchRequest, EventRequest, InspectRequest)
