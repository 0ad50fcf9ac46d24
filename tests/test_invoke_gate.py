"""The invoke route runs only what a package declares: a name from [functions], or
`module:callable` of a module that is a file of the package, whose callable is defined there.
Anything else is a 404 that runs nothing, at the edge and again in the child."""

from __future__ import annotations

import pytest

from dockyard.common.archive import package_modules
from dockyard.common.manifest import Manifest
from dockyard.errors import NotFound

from test_bootstrap import child  # noqa: F401 - the fixture

REFUSED = [
    "subprocess:getoutput", "os:getenv", "builtins:eval", "importlib:import_module",
    "dytiny:shout",                 # a package of the venv
    "main:os.getenv",               # an attribute chain
    "main:subprocess.getoutput",
    "main:__import__",              # a dunder
    "main:__builtins__",
    "nosuch:echo", "main:echo.__globals__",
]
# Past the edge (a module of the package), refused by the child: it alone knows what a module
# defines. A 404 with its record; nothing but the package's own module was imported.
REFUSED_BY_CHILD = [
    "main:getenv",                  # imported into main, not defined there
    "main:dytiny",                  # a module object
    "main:subprocess",
    "helpers.util:nope",
]


@pytest.fixture(scope="module")
def gate(server, tmp_path_factory):
    from conftest import make_package
    return server.deploy(make_package(tmp_path_factory.mktemp("gate"), "gate"))


@pytest.mark.parametrize("target", REFUSED)
def test_undeclared_targets_are_404_and_run_nothing(server, gate, target):
    before = len(server.api("GET", "/api/invocations", params={"container": "gate",
                                                                "limit": 1000}).json()[
        "invocations"])
    answer = server.invoke(f"gate/{target}", "id; echo API_KEY=$API_KEY")
    assert answer.status_code == 404, answer.text
    error = answer.json()["error"]
    assert "gate-secret-key" not in answer.text and "uid=" not in answer.text
    assert "[functions]" in error["message"]
    # Refused at the edge: no record, no invocation id, nothing sent to a worker.
    assert "invocation_id" not in answer.json() or answer.json()["invocation_id"] is None
    queued = server.invoke(f"gate/{target}", "x", params={"async": "1"})
    assert queued.status_code == 404, queued.text
    after = server.api("GET", "/api/invocations", params={"container": "gate",
                                                           "limit": 1000}).json()["invocations"]
    assert len(after) == before


@pytest.mark.parametrize("target", REFUSED_BY_CHILD)
def test_names_not_defined_by_the_package_are_refused_by_the_child(server, gate, target):
    answer = server.invoke(f"gate/{target}", "API_KEY")
    assert answer.status_code == 404, answer.text
    assert "gate-secret-key" not in answer.text
    assert answer.json()["error"]["type"] == "FunctionNotFound"
    record = server.api("GET", f"/api/invocations/{answer.json()['invocation_id']}").json()
    assert record["status"] == "failed" and record["output"] is None


def test_the_package_own_callables_run(server, gate):
    assert server.invoke("gate/echo", {"a": 1}).json() == {"a": 1}
    assert server.invoke("gate/main:echo", [1]).json() == [1]
    assert server.invoke("gate/main:undeclared", 5).json()["undeclared"] == 5
    assert server.invoke("gate/helpers.util:twice", "x").json() == ["x", "x"]


def test_the_edge_knows_the_package_modules():
    assert package_modules(["main.py", "helpers/__init__.py", "helpers/util.py", "README.md",
                            "bad-name/x.py", "data/1.py"]) == {"main", "helpers", "helpers.util"}
    manifest = Manifest(name="m", functions={"f": "main:f"}, modules=["main", "pkg.sub"])
    assert manifest.resolve_function("f") == "main:f"
    assert manifest.resolve_function("pkg.sub:run") == "pkg.sub:run"
    for target in ["os:getenv", "main:os.getenv", "main:__init__", "other:f", "main"]:
        with pytest.raises(NotFound):
            manifest.resolve_function(target)
    # A version stored before modules were listed: the standard library is refused at the
    # edge, the rest is left to the child's own check.
    old = Manifest(name="m", functions={})
    with pytest.raises(NotFound):
        old.resolve_function("subprocess:getoutput")
    assert old.resolve_function("dytiny:shout") == "dytiny:shout"


@pytest.mark.parametrize("target", ["subprocess:getoutput", "os:getenv", "builtins:eval",
                                    "json:loads", "main:os", "main:time.sleep", "main:__import__",
                                    "nosuch:f"])
def test_the_child_refuses_what_the_edge_let_through(child, target):  # noqa: F811
    """The child's own check, for a caller that got past the edge (an older version's
    manifest, a forged frame): looked for as a file of the code before anything is imported."""
    c = child()
    reply = c.call(target, "id")
    assert reply["ok"] is False, reply
    assert reply["error"]["type"] == "FunctionNotFound", reply
    assert c.call("main:echo", "fine")["result"] == "fine"
