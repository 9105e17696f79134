"""`alip explore` end to end on the built-in world (real Ray Data on a private local Ray), local and
S3, then the /explore page over its output in headless Chromium (sort, filter, paginate, images).

The model: alip-micro trained in-process on world pairs (a few seconds), exported WITH its final
gate state, as `alip pretrain` exports. The world knows which raw texts are unrelated to their image
(raw_text_related): the gate must put more of them among the lowest W_s than among the highest.
"""
from __future__ import annotations

import io
import shutil
import socket
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from alip.data.dataset import write_shard
from alip.data.world import describe, world_table
from alip.explore.job import METADATA_KEY, ExploreConfig, ExploreError, Scorer, run_explore
from alip.model import create_model, export_metadata, export_open_clip, get_tokenizer
from alip.training import ALIPTrainer, TrainConfig

pytestmark = pytest.mark.slow

N, STEPS, BATCH = 768, 60, 64


def _pixels(blobs: list[bytes], size: int) -> torch.Tensor:
    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((size, size), Image.BICUBIC)) for b in blobs]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A captioned world with two caption columns, and an alip-micro export trained on it."""
    root = tmp_path_factory.mktemp("explore_world")
    table = world_table(N, noise=0.5, seed=3)
    rows = table.to_pylist()
    table = table.append_column("caption", pa.array([describe(r, include_pattern=False) for r in rows]))
    table = table.append_column("captioner", pa.array(["reference"] * N))
    table = table.append_column("caption_b", pa.array([describe(r, include_pattern=True, include_background=False)
                                                       for r in rows]))
    for s in range(2):
        write_shard(table.slice(s * N // 2, N // 2), f"{root}/captioned/part-{s:05d}.parquet", validate=False)

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = create_model("alip-micro")
    trainer = ALIPTrainer(TrainConfig(model="alip-micro", global_batch_size=BATCH, lr=3e-3, precision="fp32"),
                          model, total_steps=STEPS)
    tok = get_tokenizer(model)
    images = _pixels(table.column("image").to_pylist(), model.image_size)
    raw = tok(table.column("raw_text").to_pylist())
    cap = tok(table.column("caption").to_pylist())
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        idx = torch.from_numpy(rng.choice(N, BATCH, replace=False))
        trainer.train_step(images[idx], raw[idx], cap[idx])
    model.eval()
    gates = {"state": trainer.gate_state.to_dict(), "sharpness": 2.0, "momentum": 0.99, "objective": "alip",
             "step": STEPS}
    export = export_open_clip(model, root / "export", gates=gates)
    return {"root": root, "data": str(root / "captioned"), "export": str(export), "table": table, "gates": gates}


@pytest.fixture(scope="module")
def ray_local(s3_server):
    import ray  # after the S3 server: its endpoint and credentials are in the env Ray's workers inherit

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def scores(world, ray_local):
    out = world["root"] / "explore" / "scores.parquet"
    summary = run_explore(ExploreConfig(model=world["export"], data=world["data"], out=str(out), batch_size=128,
                                        actors=2))
    return {"path": out, "summary": summary}


def test_scores_file_on_the_world(world, scores):
    summary, table = scores["summary"], world["table"]
    out = pq.read_table(scores["path"])
    assert out.num_rows == N and sorted(out.column("key").to_pylist()) == sorted(table.column("key").to_pylist())
    assert summary["caption_columns"] == ["caption", "caption_b"]
    for c in ("key", "raw_text", "caption", "caption_b", "source", "raw_text_related", "s_it",
              "w_s__caption", "w_t__caption", "w_c__caption", "s_tc__caption_b", "w_s__caption_b"):
        assert c in out.column_names
    assert "image" not in out.column_names  # images stay in the captioned data
    assert set(out.column("source").to_pylist()) == {"part-00000.parquet", "part-00001.parquet"}
    meta = __import__("json").loads(pq.ParquetFile(scores["path"]).metadata.metadata[METADATA_KEY])
    assert meta["gates"]["state"] == pytest.approx(world["gates"]["state"]) and meta["data"] == world["data"]

    # every row equals the scorer's own computation (the same pure functions, frozen state)
    by_key = {k: i for i, k in enumerate(table.column("key").to_pylist())}
    sample = out.slice(0, 40)
    src = table.take([by_key[k] for k in sample.column("key").to_pylist()]).append_column(
        "path", pa.array(["x/" + s for s in sample.column("source").to_pylist()]))
    direct = Scorer(world["export"], ["caption", "caption_b"], world["gates"])(src)
    for c in ("s_it", "w_s__caption", "w_t__caption", "w_c__caption", "s_ic__caption_b", "w_s__caption_b"):
        np.testing.assert_allclose(sample.column(c).to_numpy(), direct.column(c).to_numpy(), rtol=1e-4, atol=1e-6)
    w_s = out.column("w_s__caption").to_numpy()
    assert 0 < w_s.min() and w_s.max() <= 1.0 and (w_s < 1).any() and (w_s == 1).any()

    # the world's truth: unrelated raw texts gather at the low end of W_s
    fig = summary["truth"]["caption"]
    print(f"\n[explore] unrelated raw texts: 10% lowest W_s {fig['unrelated_lowest_w_s']:.1%}, "
          f"10% highest {fig['unrelated_highest_w_s']:.1%}, overall {fig['unrelated_overall']:.1%}")
    assert fig["unrelated_lowest_w_s"] > fig["unrelated_highest_w_s"]
    assert fig["unrelated_lowest_w_s"] > fig["unrelated_overall"] > fig["unrelated_highest_w_s"]

    # which text is right about what, per row, and the gate-accuracy table recomputed from the rows
    from alip.explore.scoring import gate_accuracy

    for c in ("caption", "caption_b"):
        w = {k: out.column(f"{k}__{c}").to_numpy() for k in ("w_s", "w_t", "w_c")}
        assert summary["share_caption_over_raw"][c] == pytest.approx(float((w["w_c"] > w["w_t"]).mean()))
        expected = gate_accuracy(w["w_s"], w["w_t"], w["w_c"],
                                 ~out.column("raw_text_related").to_numpy(zero_copy_only=False),
                                 out.column(f"caption_wrong__{c}").to_numpy(zero_copy_only=False),
                                 out.column(f"raw_text_adds__{c}").to_numpy(zero_copy_only=False))
        got = summary["gate_accuracy"][c]
        for key, value in expected.items():  # nested: {name: {precision, recall, predicted, positives}}
            assert got[key] == (pytest.approx(value, nan_ok=True) if not isinstance(value, dict)
                                else {k: pytest.approx(v, nan_ok=True) for k, v in value.items()}), key
    # the reference captions are right but never name the pattern; caption_b names it
    assert set(out.column("caption_truth__caption").to_pylist()) == {"shape=right colour=right pattern=absent"}
    assert set(out.column("caption_truth__caption_b").to_pylist()) == {"shape=right colour=right pattern=right"}
    related = out.column("raw_text_related").to_numpy(zero_copy_only=False)
    names_pattern = np.array(["pattern=right" in t for t in out.column("raw_text_truth").to_pylist()])
    assert (out.column("raw_text_adds__caption").to_numpy(zero_copy_only=False) == (related & names_pattern)).all()
    assert not out.column("raw_text_adds__caption_b").to_numpy(zero_copy_only=False).any()


def test_s3_in_and_out_and_clear_errors(world, ray_local, s3_bucket, tmp_path):
    import pyarrow.fs as pafs

    from alip.data.storage import resolve

    dest = resolve(f"{s3_bucket}/captioned")
    pafs.copy_files(world["data"], dest.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dest.fs)
    summary = run_explore(ExploreConfig(model=world["export"], data=f"{s3_bucket}/captioned",
                                        out=f"{s3_bucket}/explore/scores.parquet", caption_columns=["caption_b"]))
    loc = resolve(f"{s3_bucket}/explore/scores.parquet")
    t = pq.read_table(loc.path, filesystem=loc.fs)
    assert t.num_rows == N and summary["caption_columns"] == ["caption_b"] and "w_s__caption" not in t.column_names

    out = str(tmp_path / "s.parquet")
    with pytest.raises(ExploreError, match="does not exist"):
        run_explore(ExploreConfig(model=str(tmp_path / "nope"), data=world["data"], out=out))
    plain = export_open_clip(create_model("alip-micro"), tmp_path / "plain")
    with pytest.raises(ValueError, match="no gate state"):
        run_explore(ExploreConfig(model=str(plain), data=world["data"], out=out))
    write_shard(world["table"].slice(0, 0), f"{tmp_path}/empty/part-00000.parquet", validate=False)
    with pytest.raises(ExploreError, match="no rows"):
        run_explore(ExploreConfig(model=world["export"], data=f"{tmp_path}/empty", out=out))
    write_shard(world["table"].drop_columns(["caption", "caption_b", "captioner"]).slice(0, 4),
                f"{tmp_path}/raw/part-00000.parquet", validate=False)
    with pytest.raises(ExploreError, match="no caption column"):
        run_explore(ExploreConfig(model=world["export"], data=f"{tmp_path}/raw", out=out))
    assert not (tmp_path / "s.parquet").exists()
    assert export_metadata(world["export"])["gates"]["step"] == STEPS


# ----------------------------------------------------------------------------- the page, in Chromium

CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def explore_server(world, scores):
    """The service's FastAPI app (create_app + LocalBackend: the same routes Ray Serve runs) on uvicorn."""
    import uvicorn

    from alip.serving import ServeConfig, build_local_app

    cam = world["root"] / "cam.png"
    Image.new("RGB", (60, 20), (200, 30, 30)).save(cam)
    app = build_local_app(world["export"], ServeConfig(explore_roots=(str(scores["path"].parent),), cam_grid=str(cam)))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.skipif(not (CHROMIUM and DRIVER),
                    reason="headless Chromium not installed: scripts/ensure_chromium.sh")
def test_explore_page_in_headless_chromium(explore_server, scores, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    out = pq.read_table(scores["path"])
    w_s = out.column("w_s__caption").to_numpy()
    s_tc = out.column("s_tc__caption").to_numpy()
    keys = out.column("key").to_pylist()
    lowest = [keys[i] for i in np.lexsort((s_tc, w_s))]
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get(explore_server + "/explore")
        wait = WebDriverWait(driver, 60)

        def rows():
            return driver.find_elements(By.CSS_SELECTOR, "#rows tr.row")

        def shown_keys():
            return [r.get_attribute("data-key") for r in rows()]

        def images_loaded(d):
            return all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
                       for img in d.find_elements(By.CSS_SELECTOR, "#rows img"))

        # default view: raw texts the model distrusts most = lowest W_s first, 20 per page
        wait.until(lambda d: len(rows()) == 20)
        assert shown_keys() == lowest[:20]
        wait.until(images_loaded)  # every image rendered from the captioned data
        heads = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "#head th")]
        assert "caption" in heads and "caption_b" in heads  # both caption columns side by side
        assert "page 1 of" in driver.find_element(By.ID, "page-info").text

        # paginate
        driver.find_element(By.ID, "next").click()
        wait.until(lambda d: "page 2 of" in d.find_element(By.ID, "page-info").text)
        assert shown_keys() == lowest[20:40]
        wait.until(images_loaded)

        # where the caption wins: W_c - W_t, descending
        Select(driver.find_element(By.ID, "preset")).select_by_value("caption_wins")
        wait.until(lambda d: "page 1 of" in d.find_element(By.ID, "page-info").text and len(rows()) == 20)
        diffs = [float(r.get_attribute("data-w_c")) - float(r.get_attribute("data-w_t")) for r in rows()]
        assert diffs == sorted(diffs, reverse=True)
        w_c, w_t = out.column("w_c__caption").to_numpy(), out.column("w_t__caption").to_numpy()
        assert diffs[0] == pytest.approx(float((w_c - w_t).max()), abs=1e-5)

        # filter: only raw texts the truth calls unrelated, where the gate disagrees
        Select(driver.find_element(By.ID, "filter")).select_by_value("disagree")
        Select(driver.find_element(By.ID, "related")).select_by_value("unrelated")
        expected = int(((w_s < 1) & ~out.column("raw_text_related").to_numpy(zero_copy_only=False)).sum())
        wait.until(lambda d: f"({expected} matching" in d.find_element(By.ID, "page-info").text)
        assert all(r.get_attribute("data-related") == "false" and float(r.get_attribute("data-w_s")) < 1
                   for r in rows())
        wait.until(images_loaded)

        # the CAM grid is shown, and a bad page number is explained, not a crash
        wait.until(lambda d: d.execute_script("return document.getElementById('cam').naturalWidth") == 60)
        driver.execute_script("document.getElementById('goto').value = 99999;"
                              "document.getElementById('goto').dispatchEvent(new Event('change'))")
        assert "page must be 1 to" in driver.find_element(By.ID, "error").text
    finally:
        driver.quit()
