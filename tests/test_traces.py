"""Every rollout as an MLflow trace (issue 54): the main job's epochs of the calc example (``tracking.traces: all``, which
the main job sets), read back through ``mlflow.search_traces`` against the lake, then looked at in a real browser: headless
Chromium on ``mlflow ui`` over the run's store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_core import analyst
from lightning_core.common.services import free_port, start_process
from lightning_core.epoch import traces as publishing
from tests.spans_factory import shared_stages

pytestmark = pytest.mark.integration

ARCLIGHT = Path(sys.executable).with_name("arclight")
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCREENSHOTS = os.environ.get("ARCLIGHT_SCREENSHOTS")  # a folder to keep the browser test's screenshots in (the README's)


@pytest.fixture(scope="module")
def trained(main_job):
    """The main job's run (tests/test_main_job.py): three epochs of calc and held-out evaluations before and after,
    every rollout published as a trace (``tracking.traces: all``, which the main job sets: the default is sample)."""
    assert main_job.code == 0, main_job.output[-4000:]
    cfg = main_job.cfg
    assert cfg.tracking.traces == "all"
    return cfg, main_job.output


def _search(cfg, filter_string: str | None) -> list:
    import mlflow

    from lightning_core import tracking

    experiment = tracking.experiment_id(cfg)
    return mlflow.search_traces(locations=[experiment], filter_string=filter_string, return_type="list",
                                max_results=10_000)


def test_each_rollout_is_one_trace_with_the_lakes_tags_feedback_tree_and_advantages(trained):
    cfg, output = trained
    run = cfg.run_name
    con = analyst.connect(cfg)
    ran = con.execute("SELECT run_id, epoch, rollout_id, attempt FROM rollouts WHERE run_id IN (?, ?) AND status NOT IN "
                      "('planned', 'running') ORDER BY ALL", [run, f"{run}.eval"]).fetchall()
    summary = {r[0]: r for r in con.execute("SELECT rollout_id, task_id, reward, status FROM rollout_summary "
                                            "WHERE run_id = ?", [run]).fetchall()}
    advantage = {r[0]: r[1] for r in con.execute("SELECT span_id, advantage FROM triplets WHERE run_id = ?", [run]).fetchall()}
    traces = [t for t in _search(cfg, None) if t.info.tags.get("arclight.run_id") in (run, f"{run}.eval")]
    tags = [t.info.tags for t in traces]
    # one trace per rollout that ran, train and held-out alike, each complete
    assert sorted((t["arclight.run_id"], int(t["arclight.epoch"]), t["arclight.rollout_id"], int(t["arclight.attempt"]))
                  for t in tags) == sorted(ran)
    assert {t[publishing.PUBLISHED] for t in tags} == {"true"}
    assert {t["arclight.mode"] for t in tags} == {"train", "eval"}
    assert len({t["arclight.task_id"] for t in tags if t["arclight.mode"] == "eval"}) == cfg.evaluation.tasks
    for epoch in (0, 1, 2):
        tree = shared_stages(cfg, run_id=run, epoch=epoch)
        repaired = {}
        for grp, span_id, parent_span_id in tree.execute("SELECT grp, span_id, parent_span_id FROM repaired_spans").fetchall():
            repaired.setdefault(grp, set()).add((span_id, parent_span_id))
        tree.close()
        mine = [t for t in traces if t.info.tags["arclight.run_id"] == run and t.info.tags["arclight.epoch"] == str(epoch)]
        assert len(mine) == len(repaired) > 0
        for t in mine:
            rollout = t.info.tags["arclight.rollout_id"]
            task_id, reward, status = summary[rollout][1:]
            # tags and feedback are the lake's rollout_summary
            assert t.info.tags["arclight.task_id"] == task_id and float(t.info.tags["arclight.reward"]) == reward
            assert t.info.tags["arclight.status"] == "succeeded" and t.info.tags["arclight.policy_version"]
            assert [(a.name, a.value) for a in t.info.assessments] == [("reward", reward)]
            # the span tree is the repaired hierarchy: each span under its repaired parent
            ids = {s.span_id: s.attributes["arclight.span_id"] for s in t.data.spans}
            shown = {(ids[s.span_id], ids.get(s.parent_id)) for s in t.data.spans}
            assert shown == repaired[rollout], rollout
            # every LLM span carries its triplet's advantage (every call of calc trains: one policy, no judge)
            llm = [s for s in t.data.spans if s.span_type == "LLM"]
            assert llm and all(s.attributes["arclight.advantage"] == advantage[s.attributes["arclight.span_id"]]
                               for s in llm)
            assert all(s.attributes["arclight.selected"] and s.inputs["messages"] and s.outputs["choices"] for s in llm)
            assert t.info.trace_metadata.get("mlflow.sourceRun")  # linked to the policy's MLflow run
    # the summary says where they are
    assert "mlflow ui --backend-store-uri" in output and "/traces" in output and "traces:" in output


def test_a_trace_published_again_is_not_duplicated_and_one_cut_off_half_way_is_made_again(trained):
    from mlflow import MlflowClient

    cfg, _ = trained
    run = cfg.run_name
    before = _search(cfg, f"tag.`arclight.run_id` = '{run}' AND tag.`arclight.epoch` = '0'")
    cut = before[0].info.trace_id
    MlflowClient().delete_trace_tag(cut, publishing.PUBLISHED)  # as if publishing died before its last step
    result = subprocess.run([str(ARCLIGHT), "traces", "-c", str(cfg.project_dir / "config.yaml"), "--epoch", "0",
                             "--set", f"tracking.mlflow_uri={cfg.mlflow_uri}"],
                            capture_output=True, text=True, timeout=300, cwd=cfg.project_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    said = result.stdout + result.stderr  # the command's lines go to stderr, as every arclight report's
    assert f"1 published, {len(before) - 1} already there, 1 cut off before and made again" in said, said
    after = _search(cfg, f"tag.`arclight.run_id` = '{run}' AND tag.`arclight.epoch` = '0'")
    assert len(after) == len(before) and cut not in {t.info.trace_id for t in after}
    assert sorted(t.info.tags["arclight.rollout_id"] for t in after) == sorted(t.info.tags["arclight.rollout_id"]
                                                                              for t in before)


@pytest.fixture(scope="module")
def mlflow_ui(trained):
    """``mlflow ui`` on the run's store, as the train summary tells a user to start it."""
    cfg, _ = trained
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ui = start_process("mlflow ui", [str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri",
                                     cfg.mlflow_uri, "--host", "127.0.0.1", "--port", str(port)],
                       url=url, health_url=f"{url}/health", log_path=cfg.project_dir / "mlflow-ui.log", timeout_s=180,
                       cwd=cfg.project_dir)
    yield url
    ui.stop()


@pytest.fixture
def browser():
    """Headless Chromium (Debian's package) driven by its chromedriver."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver: `make setup` installs them "
                    "(apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1500,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def _page_text(driver) -> str:
    """The rendered page's text, each run of spaces as one (as a browser shows it)."""
    from selenium.webdriver.common.by import By

    return "\n".join(" ".join(line.split()) for line in driver.find_element(By.TAG_NAME, "body").text.splitlines())


def _wait_for(driver, *texts: str, timeout: float = 90) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: all(t in _page_text(d) for t in texts))


def _dismiss_popups(driver) -> None:
    """Close the tip MLflow's UI opens on a first visit, so the screenshot shows the traces."""
    from selenium.webdriver.common.by import By

    for element in driver.find_elements(By.XPATH, "//button[normalize-space()='Got it']"):
        try:
            element.click()
        except Exception:  # noqa: BLE001 - hidden or gone by now
            pass


def test_the_traces_page_and_one_trace_show_the_task_its_reward_and_the_models_answer(trained, mlflow_ui, browser,
                                                                                    tmp_path):
    from selenium.webdriver.common.by import By

    from lightning_core import tracking

    cfg, _ = trained
    shots = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    rewarded = _search(cfg, f"tag.`arclight.run_id` = '{cfg.run_name}' AND tag.`arclight.epoch` = '1' "
                            "AND tag.`arclight.reward` = '1.0'")
    trace = rewarded[0] if rewarded else _search(cfg, f"tag.`arclight.run_id` = '{cfg.run_name}'")[0]
    question = json.loads(trace.info.trace_metadata["mlflow.traceInputs"])["task"]["question"]
    answer = next(s for s in trace.data.spans if s.span_type == "LLM").outputs["choices"][0]["message"]["content"]

    newest = max(_search(cfg, None), key=lambda t: t.info.request_time)
    newest_task = json.loads(newest.info.trace_metadata["mlflow.traceInputs"])["task"]["question"]

    experiment = tracking.experiment_id(cfg)
    browser.get(f"{mlflow_ui}/#/experiments/{experiment}/traces")
    _wait_for(browser, "Traces", newest_task[:30])  # the rollouts' tasks, newest first, in the table
    _dismiss_popups(browser)
    time.sleep(1)
    browser.save_screenshot(str(shots / "mlflow-traces.png"))
    assert '"reward"' in _page_text(browser)

    browser.get(f"{mlflow_ui}/#/experiments/{experiment}/traces?selectedEvaluationId={trace.info.trace_id}")
    # the trace's span tree, its root selected: the task as its input, the reward as its output
    _wait_for(browser, f"rollout {trace.info.tags['arclight.task_id']}", "chat base", question)
    reward = float(trace.info.tags["arclight.reward"])
    assert re.search(rf"\nreward\n{reward:g}\n", _page_text(browser)), _page_text(browser)[-1500:]
    spans = browser.find_elements(By.XPATH, "//*[normalize-space(text())='chat base']")
    # the first model call: its messages and its answer (a click by script: the drawer's resize handle lies over the
    # span tree's names at some window sizes, and a pointer click there lands on it)
    browser.execute_script("arguments[0].click();", spans[0])
    _wait_for(browser, "Assistant", " ".join(answer.split())[:40])
    browser.save_screenshot(str(shots / "mlflow-trace.png"))
