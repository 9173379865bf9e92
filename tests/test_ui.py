"""The MLflow UI, read as a user reads it: headless Chromium (selenium) on `mlflow ui` over a
store made by a tiny sweep and `compare`, following what docs/ui.md promises.

Skipped, with the reason, where no browser can be started (`.ci/run` installs Chromium and
its driver). A failing check saves a screenshot under tests/ui-failures/.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from mnist_mlflow.comparison import compare
from mnist_mlflow.record import BEST_FIRST_VIEW, BY_CONFIGURATION_VIEW
from mnist_mlflow.schema import DESCRIPTION_TAG, FINAL_VAL_ACC, TEST_ACC
from mnist_mlflow.sweep import run_sweep
from tests.conftest import REPO, tiny_config, use_store

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                "(pip install -e \".[test]\")")
from selenium.common.exceptions import (  # noqa: E402
    ElementClickInterceptedException,
    ElementNotInteractableException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from common import free_port, team_server_env  # noqa: E402

EXPERIMENT = "ui"
MODEL = "ui-cnn"
FAILURES = REPO / "tests" / "ui-failures"
# The GenAI mode's tip over the whole page (it blocks every click until dismissed).
GOT_IT = "//button[normalize-space(.)='Got it']"
# The UI is a single-page app that loads its data after the page: how long to wait for it.
WAIT_S = 60


def chromium() -> tuple[str, str] | None:
    """(browser, driver) paths, when both are installed."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                   "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def ui(store_dir: Path, mnist_root: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """`mlflow ui` on a store holding a sweep of 2 variants x 2 seeds, compared and
    promoted; (its URL, ids of what the tests open)."""
    if chromium() is None:
        pytest.skip("no Chromium and chromedriver (apt-get install chromium chromium-driver)")
    with pytest.MonkeyPatch.context() as patch:
        uri = use_store(store_dir, patch)
        configs = [tiny_config(dropout=dropout, seed=seed, threads=1)
                   for seed in (1, 2) for dropout in (0.0, 0.05)]
        sweep = run_sweep(configs, mnist_root, EXPERIMENT, progress=False)
        compare(EXPERIMENT, data_dir=mnist_root, register=True, model_name=MODEL)
        client = MlflowClient()
        experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                               uri, "--host", "127.0.0.1", "--port", str(port)],
                              cwd=store_dir, env={**os.environ, **team_server_env()},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            time.sleep(0.5)
        else:
            pytest.fail("mlflow ui did not answer within 120 s")
        yield url, {"experiment": experiment, "parent": sweep.parent_run_id,
                    "child": sweep.children[0].run_id, "uri": uri}
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # `mlflow ui` and the workers it started
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    found = chromium()
    if found is None:
        pytest.skip("no Chromium and chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(options=options,
                                  service=webdriver.ChromeService(executable_path=found[1]))
    except WebDriverException as err:
        pytest.skip(f"Chromium does not start here: {str(err).splitlines()[0]}")
    yield driver
    driver.quit()


def page_text(driver: webdriver.Chrome) -> str:
    return driver.find_element(By.TAG_NAME, "body").text


def wait_for(driver: webdriver.Chrome, what: str, found: Callable[[], bool],
             name: str) -> None:
    """Wait until `found()`; else save a screenshot named `name` and fail saying `what`."""
    try:
        WebDriverWait(driver, WAIT_S, poll_frequency=0.5).until(lambda _: found())
    except TimeoutException:
        FAILURES.mkdir(exist_ok=True)
        shot = FAILURES / f"{name}.png"
        driver.save_screenshot(str(shot))
        # CI keeps the log, not the screenshot: say what the page showed too.
        shown = " | ".join(page_text(driver).splitlines()[:40])
        pytest.fail(f"{what} (screenshot: {shot.relative_to(REPO)}; the page showed: {shown})")


def open_page(driver: webdriver.Chrome, url: str) -> None:
    driver.get(url)
    # The app keeps the last view's state in the browser; a reload is what a user gets.
    driver.refresh()


# An element drawn but covered, or not yet taking clicks, while the app renders.
NOT_CLICKABLE_YET = (ElementClickInterceptedException, ElementNotInteractableException)


def click_now(driver: webdriver.Chrome, xpath: str) -> bool:
    """Click the first shown element `xpath` finds, unless something covers it (the app
    shows a moment's overlays while it loads); whether it did. A guidance tip that darkens
    the whole page ("Got it") is dismissed first, as a user would: it comes once the page's
    data has loaded, which on a busy machine can be long after the page itself."""
    for tip in driver.find_elements(By.XPATH, GOT_IT):
        if tip.is_displayed():
            with contextlib.suppress(*NOT_CLICKABLE_YET):
                tip.click()
            return False
    for element in driver.find_elements(By.XPATH, xpath):
        if element.is_displayed():
            try:
                element.click()
            except NOT_CLICKABLE_YET:
                return False
            return True
    return False


def click(driver: webdriver.Chrome, xpath: str, what: str, name: str) -> None:
    """Click the element `xpath` finds once it can be, else a screenshot and a failure."""
    wait_for(driver, f"no {what} to click", lambda: click_now(driver, xpath), name)


def training_run_names(ui: tuple[str, dict[str, str]]) -> dict[str, str]:
    """Training run id -> name, as the store holds them."""
    client = MlflowClient(tracking_uri=ui[1]["uri"])
    return {r.info.run_id: r.info.run_name
            for r in client.search_runs([ui[1]["experiment"]],
                                        "tags.mnist_mlflow.role = 'train'")}


def open_view(driver: webdriver.Chrome, url: str, experiment: str, view: str) -> None:
    """As docs/ui.md says: open the experiment (a fresh browser shows it in the GenAI mode,
    with a tip over the page: "Got it"), switch to "Model training", pick `view` in Views."""
    open_page(driver, f"{url}/#/experiments/{experiment}")
    click(driver, "//*[normalize-space(.)='Model training']", "'Model training' switch",
          "model-training")
    click(driver, "//button[@data-testid='saved-views-trigger']", "Views menu", "views")
    click(driver, f"//*[@role='menuitem'][normalize-space(.)='{view}']", f"view {view!r}",
          "views-menu")


def test_a_saved_view_shows_the_training_runs_flat_in_table_and_charts(
        ui: tuple[str, dict[str, str]], browser: webdriver.Chrome) -> None:
    url, ids = ui
    names = training_run_names(ui)
    open_view(browser, url, ids["experiment"], BEST_FIRST_VIEW)
    # Flat: every training run is a row of its own, and the sweep's parent is not one.
    wait_for(browser, "the training runs are not listed flat",
             lambda: all(n in page_text(browser) for n in names.values())
             and f"{len(names)} matching runs" in page_text(browser), "flat-table")
    assert "sweep opt" not in page_text(browser)
    assert "Group: " not in page_text(browser)
    # The ranking metric is the first metric column and, with the test figure after it, in
    # view at the browser's 1600 pixels beside the Assistant panel (the grid's right edge).
    headers, right = browser.execute_script(
        "const grid = document.querySelector('.ag-body-viewport').getBoundingClientRect();"
        "return [Array.from(document.querySelectorAll('.ag-header-cell')).map(cell => "
        "[cell.getAttribute('col-id'), cell.getBoundingClientRect().right]), grid.right];")
    metrics = [(column, edge) for column, edge in sorted(headers, key=lambda h: h[1])
               if column and column.startswith("metrics.")]
    assert [column for column, _ in metrics[:2]] == [f"metrics.`{FINAL_VAL_ACC}`",
                                                     f"metrics.`{TEST_ACC}`"], headers
    assert all(edge <= right for _, edge in metrics[:2]), (headers, right)
    click(browser, "//label[.//input[@value='CHART']]", "chart view switch", "chart-switch")
    wait_for(browser, "the chart view does not list every training run",
             lambda: all(n in page_text(browser) for n in names.values())
             and "Model metrics" in page_text(browser), "flat-charts")
    assert "sweep opt" not in page_text(browser)


def test_the_descriptions_link_opens_its_view_in_a_fresh_browser(
        ui: tuple[str, dict[str, str]], browser: webdriver.Chrome) -> None:
    """The experiment description's first link, followed by someone whose browser never
    switched to "Model training" (the mode is kept in the browser's local storage)."""
    url, ids = ui
    names = training_run_names(ui)
    description = MlflowClient(tracking_uri=ids["uri"]).get_experiment(
        ids["experiment"]).tags[DESCRIPTION_TAG]
    link = re.search(rf"\[{re.escape(BEST_FIRST_VIEW)}\]\((#[^)]+)\)", description)
    assert link, description
    browser.get(f"{url}/")
    browser.execute_script("window.localStorage.clear()")
    open_page(browser, f"{url}/{link.group(1)}")
    wait_for(browser, "the link does not open the training runs, best first",
             lambda: all(n in page_text(browser) for n in names.values())
             and f"{len(names)} matching runs" in page_text(browser), "view-link")
    assert "sweep opt" not in page_text(browser)


def test_the_other_saved_view_gives_one_group_per_configuration(
        ui: tuple[str, dict[str, str]], browser: webdriver.Chrome) -> None:
    url, ids = ui
    client = MlflowClient(tracking_uri=ids["uri"])
    groups = {client.get_run(run_id).data.tags["config_group"]
              for run_id in training_run_names(ui)}
    assert len(groups) == 2
    open_view(browser, url, ids["experiment"], BY_CONFIGURATION_VIEW)
    wait_for(browser, "the view does not make one group per configuration",
             lambda: sorted(line for line in page_text(browser).splitlines()
                            if line.startswith("Group: "))
             == sorted(f"Group: {g}" for g in groups)
             and "Group by: config_group" in page_text(browser), "grouped")


def test_a_run_page_shows_its_description_datasets_and_figures(
        ui: tuple[str, dict[str, str]], browser: webdriver.Chrome) -> None:
    url, ids = ui
    run = MlflowClient(tracking_uri=ids["uri"]).get_run(ids["child"])
    open_page(browser, f"{url}/#/experiments/{ids['experiment']}/runs/{ids['child']}")
    sentence = run.data.tags["mlflow.note.content"].split("\n")[0]
    wait_for(browser, "the run page does not show its description, datasets and params",
             lambda: sentence[:60] in page_text(browser)
             and "mnist-train-val256" in page_text(browser)
             and "config_group" in page_text(browser), "run-page")
    click(browser, "//*[normalize-space(.)='Show more']", "'Show more' of the description",
          "run-description")

    def curves_shown() -> bool:
        return any(image.get_attribute("src").count("training_curves.png")
                   and browser.execute_script("return arguments[0].naturalWidth", image) > 0
                   for image in browser.find_elements(By.TAG_NAME, "img"))
    wait_for(browser, "the run's description does not show its training curves",
             curves_shown, "run-figures")


def test_the_version_page_says_the_verdict_and_production(
        ui: tuple[str, dict[str, str]], browser: webdriver.Chrome) -> None:
    url, store = ui
    # Step 5 as docs/ui.md walks it, in Model training: Model registry (left), where a fresh
    # browser first meets a dialog about the new Model Registry UI ("Try it now" keeps it),
    # then the model, then its version marked @ production.
    open_page(browser, f"{url}/#/experiments/{store['experiment']}")
    click(browser, "//*[normalize-space(.)='Model training']", "'Model training' switch",
          "registry-mode")
    click(browser, "//a[normalize-space(.)='Model registry']", "Model registry in the menu",
          "registry-menu")
    wait_for(browser, "no dialog about the new Model Registry UI on a fresh browser",
             lambda: "governed deployments with the new Model Registry UI" in page_text(browser),
             "registry-dialog")
    click(browser, "//button[normalize-space(.)='Try it now']", "dialog's 'Try it now'",
          "registry-dialog-button")
    click(browser, f"//a[normalize-space(.)='{MODEL}']", f"model {MODEL}", "registry-model")
    wait_for(browser, "the model's versions do not show version 1 as @ production",
             lambda: "@ production" in page_text(browser), "registry-versions")
    click(browser, "//a[normalize-space(.)='Version 1']", "Version 1", "registry-version")
    wait_for(browser, "the version page does not show the verdict and @ production",
             lambda: "@ production" in page_text(browser)
             and f"{MODEL} version 1, " in page_text(browser)
             and "is production: the first promotion" in page_text(browser)
             and "comparison run" in page_text(browser), "version-page")
    # The comparison run is a link to its page, where the whole report is.
    comparison = MlflowClient(tracking_uri=store["uri"]).get_model_version(
        MODEL, "1").tags["comparison_run"]
    tabs = set(browser.window_handles)
    click(browser, f"//a[normalize-space(.)='{comparison}']", "link to the comparison run",
          "comparison-link")
    # The description's links open in a new tab, as the UI's Markdown makes them.
    wait_for(browser, "the link opens no page", lambda: len(browser.window_handles) > len(tabs)
             or f"/runs/{comparison}" in browser.current_url, "comparison-tab")
    new = set(browser.window_handles) - tabs
    first = browser.current_window_handle
    if new:
        browser.switch_to.window(new.pop())
    try:
        wait_for(browser, "the link does not open the comparison run",
                 lambda: f"/runs/{comparison}" in browser.current_url
                 and "compare" in page_text(browser), "comparison-run")
    finally:
        if new:  # the other tests go on in the first tab
            browser.close()
            browser.switch_to.window(first)
