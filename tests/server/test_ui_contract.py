"""The web page's form against the API's own schema: no browser needed.

The page (server/ui/index.html) writes its controls' defaults, limits and choices in HTML, and its
size preview (server/ui/images.js) the megapixel rules. These tests read them and compare them with
``/openapi.json``'s input schema and inference.sizing, so a changed default, limit or choice in the
API fails here until the page follows.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from inference import images, sizing
from tests.helpers import ROOT

UI = ROOT / "server" / "ui"
# Inputs the page sets by other means than a named form control: the picture and the painted mask.
NOT_IN_THE_FORM = {"image", "mask"}
# A number input cannot hold 2**63 - 1 exactly: the page leaves the seed's maximum to the server.
NO_MAX_ON_THE_PAGE = {"seed"}


class _Form(HTMLParser):
    """The prediction form's named controls, its sliders and each field's hint text."""

    def __init__(self):
        super().__init__()
        self.controls: dict[str, dict] = {}
        self.options: dict[str, list[str]] = {}
        self.sliders: dict[str, dict] = {}  # mirrored field id -> the slider's attributes
        self.hints: dict[str, str] = {}
        self._in_form = False
        self._field: str | None = None
        self._select: str | None = None
        self._option: dict | None = None
        self._hint: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = {k: (v if v is not None else "") for k, v in attrs}
        if tag == "form" and a.get("id") == "predict-form":
            self._in_form = True
        if not self._in_form:
            return
        if "data-field" in a:
            self._field = a["data-field"]
        if tag in ("input", "select", "textarea") and a.get("name"):
            self.controls[a["name"]] = {"tag": tag, **a}
            if tag == "select":
                self._select = a["name"]
                self.options[a["name"]] = []
        if tag == "input" and a.get("type") == "range" and "data-mirror" in a:
            self.sliders[a["data-mirror"]] = a
        if tag == "option" and self._select:
            self._option = a
            self._text = []
        if tag == "p" and "hint" in a.get("class", "").split() and self._field:
            self._hint = []

    def handle_data(self, data):
        if self._option is not None:
            self._text.append(data)
        if self._hint is not None:
            self._hint.append(data)

    def handle_endtag(self, tag):
        if tag == "option" and self._option is not None:
            self.options[self._select].append(self._option.get("value", "".join(self._text).strip()))
            self._option = None
        elif tag == "select":
            self._select = None
        elif tag == "p" and self._hint is not None:
            self.hints[self._field] = "".join(self._hint).strip()
            self._hint = None
        elif tag == "form":
            self._in_form = False


@pytest.fixture(scope="module")
def form() -> _Form:
    parser = _Form()
    parser.feed((UI / "index.html").read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def schema(tmp_path_factory) -> dict:
    """The input schema as /openapi.json serves it (each optional field's non-null branch)."""
    from server.app import create_app
    from server.settings import Settings

    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("data")))
    properties = app.openapi()["components"]["schemas"]["PredictionInput"]["properties"]
    flat = {}
    for name, prop in properties.items():
        branch = next((b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"), prop)
        flat[name] = {**branch, **{k: v for k, v in prop.items() if k != "anyOf"}}
    return flat


def _number(text: str) -> float:
    return float(text)


def test_every_input_has_its_control_and_no_other(form, schema):
    assert set(form.controls) == set(schema) - NOT_IN_THE_FORM


def test_defaults_are_the_schemas(form, schema):
    for name, control in form.controls.items():
        prop = schema[name]
        default = control.get("data-default")
        if name == "prompt":
            continue  # required: no default
        if control.get("type") == "checkbox":
            assert default == str(prop["default"]).lower(), name
        elif "default" not in prop or prop["default"] is None:
            assert default == "", name
        elif prop.get("type") in ("integer", "number"):
            assert _number(default) == prop["default"], name
            assert _number(control["value"]) == prop["default"], name  # what the page shows at load
        else:
            assert default == prop["default"], name


def test_limits_are_the_schemas(form, schema):
    for name, control in form.controls.items():
        prop = schema[name]
        if prop.get("type") not in ("integer", "number"):
            continue
        assert _number(control["min"]) == prop["minimum"], name
        if name in NO_MAX_ON_THE_PAGE:
            assert "max" not in control, name
        else:
            assert _number(control["max"]) == prop["maximum"], name
        assert control["step"] == ("1" if prop["type"] == "integer" else "any"), name
        slider = form.sliders.get(control["id"])
        if slider is not None:  # the slider beside it spans the same range from the same default
            assert (_number(slider["min"]), _number(slider["max"]), _number(slider["value"])) == \
                (prop["minimum"], prop["maximum"], prop["default"]), name


def test_hints_say_the_schemas_limits(form, schema):
    checked = 0
    for name, hint in form.hints.items():
        found = re.match(r"(-?\d+(?:\.\d+)?) to (-?\d+(?:\.\d+)?)", hint)
        if found and name in schema:
            assert (float(found[1]), float(found[2])) == (schema[name]["minimum"], schema[name]["maximum"]), name
            checked += 1
    assert checked >= 7  # outputs, steps, guidance, quality, LoRA scale, mask grow and blur, crop margin


def test_choices_are_the_schemas(form, schema):
    for name, options in form.options.items():
        assert options == schema[name]["enum"], name
    assert set(form.options) == {name for name, prop in schema.items() if "enum" in prop}


def test_the_size_preview_follows_the_servers_rules():
    text = (UI / "images.js").read_text(encoding="utf-8")
    targets = re.search(r"const TARGETS = \{([^}]*)\}", text)[1]
    parsed = {key: eval(value, {}) for key, value in re.findall(r'"([^"]+)":\s*([\d\s*]+)', targets)}  # noqa: S307
    assert parsed == sizing.TARGET_PIXELS
    assert set(parsed) | {"match_input"} == set(sizing.MEGAPIXELS)
    assert int(re.search(r"const MATCH_INPUT_MAX_SIDE = (\d+);", text)[1]) == sizing.MATCH_INPUT_MAX_SIDE
    assert int(re.search(r"const MULTIPLE = (\d+);", text)[1]) == sizing.MULTIPLE
    sendable = set(re.findall(r'"(image/[a-z]+)"', re.search(r"const SENDABLE = new Set\(\[([^\]]*)\]", text)[1]))
    assert sendable <= set(images.ACCEPTED_TYPES.values())  # what the page sends as is, the server reads
