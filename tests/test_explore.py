"""`alip explore` without Ray: the scoring equals the training gates, the export carries the momentum
state (and open_clip still loads it), and the explorer API sorts, filters and pages a scores file,
answering 4xx to client mistakes; plus page latency on a 1M-row file."""
from __future__ import annotations

import io
import json
import time

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from alip.data.dataset import write_shard
from alip.explore.job import METADATA_KEY, ROW_GROUP, ExploreError, _output_schema, detect_caption_columns
from alip.explore.scoring import GateSettings, GateSettingsError, gate_scores, score_columns, truth_figure
from alip.gates import GateState, consistency_gates
from alip.model import create_model, export_metadata, export_open_clip
from alip.serving.config import ServeConfig
from alip.serving.inputs import ClientError
from alip.serving.middleware import error_body


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_scores_are_the_training_gates_with_the_frozen_state():
    image, raw, cap, cap2 = _unit(6, 8, 0), _unit(6, 8, 1), _unit(6, 8, 2), _unit(6, 8, 3)
    raw[0] = cap[0]  # one sample whose raw text equals its caption: W_s must be 1
    state = GateState(text_caption=0.1, image_text=-0.05, image_caption=0.2)
    settings = GateSettings(state=state, sharpness=2.0)
    out = gate_scores(image, raw, {"caption": cap, "caption_b": cap2}, settings)
    assert sorted(out) == sorted(score_columns(["caption", "caption_b"]))
    for name, c in (("caption", cap), ("caption_b", cap2)):
        # the same function as training; momentum 1.0 keeps the means at the export's state
        g = consistency_gates(image, raw, c, state, 2.0, momentum=1.0)
        assert g.state.to_dict() == pytest.approx(state.to_dict(), abs=1e-7)
        np.testing.assert_allclose(out[f"w_s__{name}"], g.sample_weight.numpy(), rtol=1e-6)
        np.testing.assert_allclose(out[f"w_t__{name}"], g.raw_pair_weight.numpy(), rtol=1e-6)
        np.testing.assert_allclose(out[f"w_c__{name}"], g.caption_pair_weight.numpy(), rtol=1e-6)
        # and by hand, from the gate formulas
        s_tc, s_it, s_ic = (raw * c).sum(-1), (image * raw).sum(-1), (image * c).sum(-1)
        w = torch.exp(2.0 * (s_tc - 0.1))
        np.testing.assert_allclose(out[f"w_s__{name}"], w.clamp(max=1).numpy(), rtol=1e-5)
        dis = w < 1
        np.testing.assert_allclose(out[f"w_t__{name}"], torch.where(dis, torch.exp(2 * (s_it + 0.05)), 1.0).numpy(), rtol=1e-5)
        np.testing.assert_allclose(out[f"w_c__{name}"], torch.where(dis, torch.exp(2 * (s_ic - 0.2)), 1.0).numpy(), rtol=1e-5)
        np.testing.assert_allclose(out[f"s_tc__{name}"], s_tc.numpy(), rtol=1e-6)
        np.testing.assert_allclose(out[f"s_ic__{name}"], s_ic.numpy(), rtol=1e-6)
    assert out["w_s__caption"][0] == 1.0
    # a sample's scores do not depend on its batch mates
    alone = gate_scores(image[3:4], raw[3:4], {"caption": cap[3:4]}, settings)
    assert alone["w_s__caption"][0] == pytest.approx(out["w_s__caption"][3], rel=1e-6)


def test_truth_figure_counts_unrelated_in_the_tails():
    score = np.arange(20, dtype=np.float32)
    unrelated = np.array([True] * 3 + [False] * 17)
    fig = truth_figure(score, unrelated, 0.1)
    assert (fig["k"], fig["unrelated_lowest_w_s"], fig["unrelated_highest_w_s"]) == (2, 1.0, 0.0)
    assert fig["unrelated_overall"] == pytest.approx(0.15)


def test_export_stores_the_gate_state_and_open_clip_still_loads_it(tmp_path):
    model = create_model("alip-micro")
    gates = {"state": {"text_caption": 0.31, "image_text": 0.12, "image_caption": 0.27}, "sharpness": 2.0,
             "momentum": 0.99, "objective": "alip", "step": 40}
    out = export_open_clip(model, tmp_path / "export", gates=gates)
    meta = export_metadata(out)
    assert meta["gates"] == gates and meta["model_name"] == "alip-micro"
    s = GateSettings.from_export(meta)
    assert s.state == GateState(0.31, 0.12, 0.27) and s.step == 40
    clip, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(out))
    for k, v in model.clip.state_dict().items():
        assert torch.equal(clip.state_dict()[k], v)
    # an export without a gate state: a clear error, not silently the initial state
    plain = export_open_clip(model, tmp_path / "plain")
    with pytest.raises(GateSettingsError, match="no gate state"):
        GateSettings.from_export(export_metadata(plain), where=str(plain))


def test_caption_columns_detection():
    schema = pa.schema([("key", pa.string()), ("image", pa.binary()), ("raw_text", pa.string()),
                        ("caption_blip", pa.string()), ("caption", pa.string()), ("captioner", pa.string())])
    assert detect_caption_columns(schema) == ["caption", "caption_blip"]
    assert detect_caption_columns(schema, ["caption_blip"]) == ["caption_blip"]
    with pytest.raises(ExploreError, match="not in the data"):
        detect_caption_columns(schema, ["caption_git"])
    with pytest.raises(ExploreError, match="no caption column"):
        detect_caption_columns(pa.schema([("key", pa.string()), ("raw_text", pa.string())]))


# ----------------------------------------------------------------------------- a synthetic scores file

def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8 + i % 5, 8), ((37 * i) % 256, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


def write_synthetic_scores(path, n: int, data_dir=None, captions=("caption", "caption_b"), seed: int = 0) -> dict:
    """Random but consistent scores (W_s = min(exp(2 (s_tc - 0.2)), 1), ...), written as the job writes them."""
    rng = np.random.default_rng(seed)
    keys = np.char.add("k", np.arange(n).astype(str))
    cols = {"key": pa.array(keys), "raw_text": pa.array(np.char.add("raw ", np.arange(n).astype(str)))}
    for c in captions:
        cols[c] = pa.array(np.char.add(f"{c} ", np.arange(n).astype(str)))
    cols["source"] = pa.array(np.where(np.arange(n) < n // 2, "part-00000.parquet", "part-00001.parquet"))
    related = rng.random(n) < 0.5
    cols["raw_text_related"] = pa.array(related)
    cols["s_it"] = pa.array(rng.uniform(-0.2, 0.6, n).astype(np.float32))
    for c in captions:
        s_tc = rng.uniform(-0.3, 0.9, n).astype(np.float32)
        w = np.exp(2 * (s_tc - 0.2))
        dis = w < 1
        cols[f"s_tc__{c}"] = pa.array(s_tc)
        cols[f"s_ic__{c}"] = pa.array(rng.uniform(-0.2, 0.6, n).astype(np.float32))
        cols[f"w_s__{c}"] = pa.array(np.minimum(w, 1).astype(np.float32))
        cols[f"w_t__{c}"] = pa.array(np.where(dis, rng.uniform(0.3, 2, n), 1).astype(np.float32))
        cols[f"w_c__{c}"] = pa.array(np.where(dis, rng.uniform(0.3, 2, n), 1).astype(np.float32))
    schema = _output_schema(list(captions), True)
    table = pa.table(cols).cast(schema)
    meta = {"rows": n, "data": str(data_dir or "/nonexistent"), "model": "synthetic", "caption_columns": list(captions)}
    with pq.ParquetWriter(str(path), schema) as w:
        w.write_table(table, row_group_size=ROW_GROUP)
        w.add_key_value_metadata({METADATA_KEY: json.dumps(meta).encode()})
    if data_dir is not None:
        half = n // 2
        for s, (lo, hi) in enumerate(((0, half), (half, n))):
            write_shard(pa.table({"key": keys[lo:hi], "image": pa.array([_png(i) for i in range(lo, hi)], pa.binary()),
                                  "raw_text": cols["raw_text"].slice(lo, hi - lo)}),
                        f"{data_dir}/part-{s:05d}.parquet")
    return {"table": table}


@pytest.fixture(scope="module")
def explorer(tmp_path_factory):
    from alip.serving.explore import explore_router

    root = tmp_path_factory.mktemp("explore")
    data = root / "data"
    data.mkdir()
    (root / "scores").mkdir()
    made = write_synthetic_scores(root / "scores" / "a.parquet", 3000, data_dir=data)
    (root / "scores" / "notes.parquet").write_bytes(b"not parquet")
    pq.write_table(pa.table({"x": [1]}), root / "scores" / "plain.parquet")
    cam = root / "cam.png"
    cam.write_bytes(_png(3))
    app = FastAPI()

    @app.exception_handler(ClientError)
    async def _err(_, e: ClientError):
        from fastapi.responses import JSONResponse
        return JSONResponse(error_body(e.status, e.code, e.message), status_code=e.status)

    app.include_router(explore_router(ServeConfig(explore_roots=(str(root / "scores"),), cam_grid=str(cam))))
    with TestClient(app) as client:
        yield {"client": client, "table": made["table"], "cam": cam.read_bytes()}


def _get(client, **params):
    r = client.get("/explore/api/rows", params={"file": "0/a.parquet", **params})
    assert r.status_code == 200, r.text
    return r.json()


def test_files_are_listed_with_ids_under_the_roots(explorer):
    files = explorer["client"].get("/explore/api/files").json()
    assert [f["id"] for f in files["files"]] == ["0/a.parquet", "0/notes.parquet", "0/plain.parquet"]
    assert files["cam_grid"] is True and "caption_wins" in files["sorts"]


def test_sort_filter_and_paginate_match_numpy(explorer):
    client, t = explorer["client"], explorer["table"]
    w_s = t.column("w_s__caption").to_numpy()
    s_tc = t.column("s_tc__caption").to_numpy()
    order = np.lexsort((s_tc, w_s))
    first = _get(client, sort="w_s", order="asc", per_page=50)
    assert first["total"] == 3000 and first["pages"] == 60
    assert [r["row"] for r in first["rows"]] == order[:50].tolist()
    r0 = first["rows"][0]
    assert r0["key"] == t.column("key")[r0["row"]].as_py()
    assert r0["captions"] == {"caption": f"caption {r0['row']}", "caption_b": f"caption_b {r0['row']}"}
    assert r0["scores"]["caption"]["w_s"] == pytest.approx(float(w_s[r0["row"]]))
    # page 3 of the same view, and descending
    p3 = _get(client, sort="w_s", order="asc", per_page=50, page=3)
    assert [r["row"] for r in p3["rows"]] == order[150:200].tolist()
    desc = _get(client, sort="w_s", order="desc", per_page=10)
    assert [r["row"] for r in desc["rows"]] == order[::-1][:10].tolist()
    # where the caption wins, on the second caption column
    w_c, w_t = t.column("w_c__caption_b").to_numpy(), t.column("w_t__caption_b").to_numpy()
    wins = _get(client, sort="caption_wins", order="desc", caption="caption_b", per_page=20)
    got = [r["row"] for r in wins["rows"]]
    assert np.all(np.diff((w_c - w_t)[got]) <= 0) and (w_c - w_t)[got[0]] == pytest.approx((w_c - w_t).max())
    # filters: disagree (W_s < 1) and the ground truth
    dis = _get(client, filter="disagree", related="unrelated", per_page=200)
    related = t.column("raw_text_related").to_numpy(zero_copy_only=False)
    assert dis["total"] == int(((w_s < 1) & ~related).sum())
    assert all(r["scores"]["caption"]["w_s"] < 1 and r["raw_text_related"] is False for r in dis["rows"])
    agree = _get(client, filter="agree")
    assert agree["total"] == int((w_s >= 1).sum())


@pytest.mark.parametrize("params,status", [
    ({"page": "999"}, 422), ({"page": "-1"}, 422), ({"page": "x"}, 422), ({"sort": "nope"}, 422),
    ({"order": "up"}, 422), ({"caption": "caption_zz"}, 422), ({"per_page": "100000"}, 422),
    ({"filter": "some"}, 422), ({"file": "0/missing.parquet"}, 404), ({"file": "0/../cam.png"}, 404),
    ({"file": "/etc/passwd"}, 404), ({"file": "7/a.parquet"}, 404), ({"file": "0//etc/x.parquet"}, 404),
    ({"file": ""}, 422), ({"file": "0/notes.parquet"}, 422), ({"file": "0/plain.parquet"}, 422),
])
def test_client_mistakes_are_4xx(explorer, params, status):
    r = explorer["client"].get("/explore/api/rows", params={"file": "0/a.parquet", **params})
    assert r.status_code == status, r.text
    assert r.json()["error"]["status"] == status


def test_images_come_from_the_captioned_data_and_the_cam_grid_is_served(explorer):
    client = explorer["client"]
    for row in (0, 1500, 2999):
        r = client.get("/explore/api/image", params={"file": "0/a.parquet", "row": row})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content == _png(row)
    assert client.get("/explore/api/image", params={"file": "0/a.parquet", "row": 3000}).status_code == 422
    r = client.get("/explore/api/cam")
    assert r.status_code == 200 and r.content == explorer["cam"]
    assert client.get("/explore").status_code == 200


@pytest.mark.slow
def test_page_latency_on_a_million_rows(tmp_path, capsys):
    from alip.serving.explore import ScoresFile

    n = 1_000_000
    t0 = time.perf_counter()
    write_synthetic_scores(tmp_path / "big.parquet", n, captions=("caption",))
    written = time.perf_counter() - t0
    sf = ScoresFile(str(tmp_path / "big.parquet"))
    t0 = time.perf_counter()
    first = sf.page("w_s", "caption", False, "all", "all", 0, 50)
    cold = time.perf_counter() - t0
    times = []
    for page, sort, filt in ((1, "w_s", "all"), (5000, "w_s", "all"), (19999, "w_s", "all"),
                             (10, "w_s", "disagree"), (123, "w_s", "disagree")):
        t0 = time.perf_counter()
        out = sf.page(sort, "caption", False, filt, "all", page, 50)
        times.append(time.perf_counter() - t0)
        assert len(out["rows"]) == 50
    t0 = time.perf_counter()
    sf.page("caption_wins", "caption", True, "all", "all", 0, 50)  # a new sort: one argsort
    new_sort = time.perf_counter() - t0
    assert first["total"] == n
    warm = float(np.median(times))
    with capsys.disabled():
        print(f"\n[explore] 1M-row scores file ({(tmp_path / 'big.parquet').stat().st_size / 1e6:.0f} MB, written in "
              f"{written:.1f}s): first page {cold * 1000:.0f} ms (loads columns + sort), new sort "
              f"{new_sort * 1000:.0f} ms, warm page median {warm * 1000:.1f} ms, max {max(times) * 1000:.1f} ms")
    assert warm < 0.25 and max(times) < 1.0
