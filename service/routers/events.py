"""`POST /events`: a click into the user's history and the click log."""
import time

import orjson
from fastapi.responses import Response

from .. import errors
from ..deps import StateDep
from ..history import ClickLogFull, HistoryError
from ..schemas import EventBody, EventResponse, RequestModels
from . import Router, bind


async def events(req: EventBody, st: StateDep) -> Response:
    """Record a click: it becomes the newest entry of the user's history (capped) and, with
    the click log on, an entry of the log; both or neither. A retry with the same
    `event_id` (ids are per user) is answered `duplicate: true` and writes nothing. With
    `SINE_EVENTS_TOKEN` set, the call needs `Authorization: Bearer <token>`."""
    t0 = time.perf_counter()
    if st.store is None:
        raise errors.HistoryUnavailable("No history store is configured (SINE_REDIS_URL).")
    user = str(req.user_id)
    with st.admission.admit(1, "events"):
        try:
            length, eid, dup = await st.store.append(user, str(req.item_id), req.event_id)
        except ClickLogFull as e:
            st.metrics.events.labels("refused_full").inc()
            raise errors.ClickLogFull(f"The click was not recorded: {e}.",
                                      {"Retry-After": "60"}) from e
        except HistoryError as e:
            raise errors.HistoryUnavailable(
                f"The click may not have been recorded: {e}. Retry with the same event_id "
                f"(it is stored once).", {"Retry-After": "1"}) from e
    st.metrics.events.labels("duplicate" if dup else "recorded").inc()
    st.metrics.child(st.metrics.request, "events").observe(time.perf_counter() - t0)
    return Response(orjson.dumps({"user_id": user, "history_length": length,
                                  "event_id": eid, "duplicate": dup}),
                    media_type="application/json")


def register(app: Router, models: RequestModels) -> None:
    app.add_api_route("/events", bind(events, req=models.event), methods=["POST"],
                      response_model=EventResponse, tags=["history"],
                      responses=errors.responses(400, 401, 408, 413, 415, 422, 429, 503))
