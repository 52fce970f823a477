"""The programs of tools/ in tests: their command line, its environment, and the modules in this process."""
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool_path(name: str) -> str:
    return os.path.join(REPO, "tools", name + ".py")


def tool_command(name: str, *args) -> list:
    """``python tools/<name>.py ARGS...`` with this interpreter."""
    return [sys.executable, tool_path(name), *map(str, args)]


def tool_env(**extra) -> dict:
    """This environment with the repository first on PYTHONPATH: the tool imports the fsaf_d2 under test."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def load_tool(name: str):
    """``tools/<name>.py`` as a module of this process (by path: Detectron2 installs a ``tools`` package too)."""
    spec = importlib.util.spec_from_file_location(f"fsaf_d2_tools_{name}", tool_path(name))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
