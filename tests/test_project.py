"""The promises the README makes about itself and CI."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)[:2]


def test_readme_opens_with_the_demo_and_test_commands():
    start, test = readme_commands()
    assert start == "pip install -r requirements.txt && python app.py"
    assert test.startswith("pip install -r requirements-dev.txt") and "pytest" in test


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines


def test_space_front_matter():
    front = (ROOT / "README.md").read_text().split("---")[1]
    assert "sdk: gradio" in front and "app_file: app.py" in front and "license:" in front


def test_assets_have_licences_noted():
    notes = (ROOT / "assets" / "LICENSES.md").read_text()
    for path in (ROOT / "assets").iterdir():
        if path.suffix in (".jpg", ".png"):
            assert f"`{path.name}`" in notes, path.name
