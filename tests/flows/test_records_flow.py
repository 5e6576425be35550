"""The evolve flow's typed `config: RunConfig` parameter and its typed records, on a real small run."""

from __future__ import annotations

import json

import pytest
from test_evolve import make_config

from evomerge_core.config.schema import RunConfig, parse_run_config
from evomerge_core.runs.records import CandidateRecord, GenerationSummary, RunResult
from evomerge_core.runs.resume import candidate_keys
from evomerge_core.runs.layout import RESULT, open_store
from evomerge_core.runs.store import canonical_json

pytestmark = pytest.mark.timeout(300)


def test_parameter_schema_shows_the_run_config_fields():
    """The Prefect UI's form for the flow is built from this schema."""
    from evomerge.flows.evolve import evolve
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(evolve.fn).model_dump()
    assert schema["properties"]["config"]["$ref"].endswith("/RunConfig")
    assert "config" in schema["required"]
    fields = schema["definitions"]["RunConfig"]["properties"]
    assert {"sources", "space", "optimizer", "fitness", "runtime", "output", "storage"} <= set(fields)
    assert "FitnessConfig" in schema["definitions"] and "OptimizerConfig" in schema["definitions"]


def test_flow_run_parameters_mask_storage_option_secrets(tiny_family, tiny_dataset, tmp_path, monkeypatch):
    from evomerge.flows.evolve import evolve

    secret = "plantedOptionSecret0123"
    monkeypatch.setenv("HF_TOKEN", "hf_plantedEnvToken0123")
    raw = make_config(tiny_family, tiny_dataset, tmp_path, "hf_plantedEnvToken0123",  # an env secret elsewhere
                      storage_options={"endpoint_url": "http://127.0.0.1:9", "secret": secret,
                                       "client_kwargs": {"aws_session_token": "plantedNestedToken0123"}})
    sent = evolve.serialize_parameters({"config": parse_run_config(raw), "resume": True, "run_key": "masked"})
    text = json.dumps(sent)
    for planted in (secret, "plantedNestedToken0123", "hf_plantedEnvToken0123"):
        assert planted not in text
    assert sent["config"]["storage_options"]["endpoint_url"] == "http://127.0.0.1:9"  # not a secret: kept
    assert sent["config"]["storage_options"]["secret"] == "***"
    assert sent["config"]["sources"][0]["model"] == str(tiny_family["base"])
    assert sent["resume"] is True


def test_dict_and_typed_config_are_the_same_run(tiny_family, tiny_dataset, tmp_path):
    """Passing the RunConfig or its JSON form gives the same run key, hash and candidate keys."""
    from evomerge.flows.evolve import _parsed

    raw = make_config(tiny_family, tiny_dataset, tmp_path, None)
    typed, from_dict = _parsed(parse_run_config(raw)), _parsed(raw)
    assert isinstance(typed, RunConfig)
    assert typed.effective_run_key() == from_dict.effective_run_key()
    assert typed.config_hash() == from_dict.config_hash()
    genomes = [[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]]
    assert candidate_keys(typed, {"a": "1"}, genomes) == candidate_keys(from_dict, {"a": "1"}, genomes)


def test_typed_run_records_round_trip_the_stored_json(tiny_family, tiny_dataset, tmp_path):
    """A run started with a RunConfig: every stored candidate, summary and result.json reads into
    its record and writes back byte for byte; the flow's records are the evaluator's dicts."""
    from evomerge.flows.evolve import evolve
    from prefect import get_client

    cfg = parse_run_config(make_config(tiny_family, tiny_dataset, tmp_path, "typed",
                                       fitness__validation={"path": str(tiny_dataset["test"]),
                                                            "columns": {"prompt": "question", "answer": "target"}},
                                       fitness__selection="validation"))
    state = evolve(cfg, return_state=True)
    result = state.result()
    store = open_store(cfg)
    stored = store.read_json(RESULT)
    assert canonical_json(result) == canonical_json(stored)
    assert RunResult.from_dict(stored).to_json() == json.dumps(stored)
    assert RunResult.from_dict(result).to_json() == json.dumps(result)
    documents = [store.read_generation(g) for g in range(2)]
    cached = {json.dumps(c["genome"]): c for c in
              (store.get_candidate(p.stem) for p in (tmp_path / "typed" / "candidates").glob("*.json"))}
    assert len(cached) >= 4
    for doc in documents:
        for c in doc["candidates"]:
            rec = CandidateRecord.from_dict(c)
            assert rec.to_json() == json.dumps(c) and canonical_json(rec.to_dict()) == canonical_json(c)
            # what the task stored (the evaluator's dict) is what the generation holds
            assert cached[json.dumps(c["genome"])] == c
        assert GenerationSummary.from_dict(doc["summary"]).to_json() == json.dumps(doc["summary"])
    assert result["generations"] == [doc["summary"] for doc in documents]
    assert [(h["generation"], h["index"], h["fitness"]) for h in result["history"]] == \
        [(c["generation"], c["index"], c["fitness"]) for doc in documents for c in doc["candidates"]]
    assert result["best_validation"] is not None and result["selection"] == "validation"
    with get_client(sync_client=True) as client:
        parameters = client.read_flow_run(state.state_details.flow_run_id).parameters
    assert parameters["config"]["run_key"] == "typed"
    assert parameters["config"]["optimizer"]["popsize"] == 4

