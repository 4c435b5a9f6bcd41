"""Schema-driven fuzzing of the REST API (schemathesis), against ``FakePipeline``.

Every operation of the app's own OpenAPI document gets requests generated from it, valid ones
and ones that break the schema (wrong types, missing fields, odd path parameters, bodies that
are not images); ``tests.fuzz.inputs(BASE_API_REQUESTS)`` in all (2,000 in ``make test``).
The v2 ``infer`` body is not in the schema (the handler reads it raw), so it is fuzzed too:
valid JSON requests with values replaced by edge values. The property: no 5xx, no hang (each
answer within ``MAX_ANSWER_S``), every error a JSON body.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from tests.appliance.test_fuzz_decoders import json_mutation
from tests.fuzz import BASE_API_REQUESTS, fuzz_settings, inputs
from tests.web import INPUT_SHAPE, MODEL_ID, FakePipeline
from web.app import create_app
from web.limits import ApiLimits

pytestmark = pytest.mark.fuzz

MAX_ANSWER_S = 10.0
STATUSES: Counter[int] = Counter()


def _app() -> Any:
    # The rate limit is off here (every request comes from one test client): it has tests of
    # its own; the batch, size and time limits stay on.
    return create_app(FakePipeline(), limits=ApiLimits(rate_per_s=0))


def _check(status: int, seconds: float, content_type: str, what: str) -> None:
    STATUSES[status] += 1
    assert status < 500, what
    assert seconds < MAX_ANSWER_S, f"{what}: answered after {seconds:.1f} s"
    if status >= 400:
        assert content_type.startswith("application/json"), what


def _fuzz(strategy: Any, examples: int) -> int:
    """Send ``examples`` requests drawn from ``strategy``; how many were sent (fewer when the
    operation has fewer distinct requests, e.g. a GET without parameters)."""
    sent = 0

    @fuzz_settings(examples)
    @given(strategy)
    def call(case: Any) -> None:
        nonlocal sent
        sent += 1
        start = time.perf_counter()
        response = case.call()
        header = response.headers.get("content-type") or [""]
        _check(response.status_code, time.perf_counter() - start,
               header[0] if isinstance(header, list) else str(header),
               f"{case.method} {case.formatted_path} {case.query} {case.headers}: "
               f"{response.status_code}")

    call()
    return sent


# Path parameters that name what exists, so requests get past the 404s half the time.
KNOWN = {"model": MODEL_ID, "version": "1", "name": "worker-1"}


def _strategy(operation: Any, mode: Any) -> Any:
    known = {k: v for k, v in KNOWN.items() if "{" + k + "}" in operation.path}
    plain = operation.as_strategy(mode)
    if not known:
        return plain
    # (the v2 routes without {version} take it as a query parameter: leave it out there)
    return st.one_of(plain, operation.as_strategy(mode, path_parameters=known, query={}))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_fuzz_the_api_from_its_openapi_document() -> None:
    import schemathesis
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", _app())
    # an operation the document does not describe well is an Err, whose .ok() raises here
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 10
    target = inputs(BASE_API_REQUESTS)
    # Requests that break the schema, where the operation has something to break (a
    # parameter or a body; for the others hypothesis finds none at once): 15% of the total.
    negative = 0
    for operation in operations:
        try:
            negative += _fuzz(_strategy(operation, GenerationMode.NEGATIVE),
                              max(1, target * 15 // 100 // 5))
        except Unsatisfiable:
            continue
    # Valid requests for the rest, spread over the operations, until the total is reached.
    positive = 0
    open_ops = list(operations)
    while negative + positive < target and open_ops:
        share = math.ceil((target - negative - positive) / len(open_ops))
        for operation in list(open_ops):
            sent = _fuzz(_strategy(operation, GenerationMode.POSITIVE), share)
            positive += sent
            if sent < share:  # every distinct request of it was sent
                open_ops.remove(operation)
    print(f"schemathesis: {negative + positive} requests ({negative} breaking the schema) over "
          f"{len(operations)} operations, statuses {dict(sorted(STATUSES.items()))}")
    assert negative + positive >= target


_INFER_DOC = {"id": "r1", "inputs": [{"name": "input", "datatype": "FP32",
                                      "shape": list(INPUT_SHAPE),
                                      "data": [0.5] * math.prod(INPUT_SHAPE)}],
              "outputs": [{"name": "output", "parameters": {"binary_data": False}}],
              "parameters": {"binary_data_output": False}}


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_fuzz_v2_infer_bodies() -> None:
    count = inputs(BASE_API_REQUESTS) // 4
    with TestClient(_app()) as client:
        assert client.post(f"/v2/models/{MODEL_ID}/infer", json=_INFER_DOC).status_code == 200

        @fuzz_settings(count)
        @given(st.integers(0, 2**64))
        def call(seed: int) -> None:
            body = json.dumps(json_mutation(_INFER_DOC, random.Random(seed)))
            start = time.perf_counter()
            response = client.post(f"/v2/models/{MODEL_ID}/infer", content=body,
                                   headers={"content-type": "application/json"})
            _check(response.status_code, time.perf_counter() - start,
                   response.headers.get("content-type", ""), f"infer {body[:200]}")

        call()
