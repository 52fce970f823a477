"""The programs of tools/ in tests: their command line, its environment, and the modules in this process."""
import importlib.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

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


def run_side_by_side(commands, cwd, env=None, timeout=300) -> list:
    """``subprocess.run`` of every command at once, output captured as text; the results in order. A program
    that spends its seconds importing torch uses one core, so two of them share a 2-core machine's time."""
    def run(command):
        return subprocess.run(command, cwd=cwd, env=env or tool_env(), capture_output=True, text=True,
                              timeout=timeout)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return list(pool.map(run, commands))


def load_tool(name: str):
    """``tools/<name>.py`` as a module of this process (by path: Detectron2 installs a ``tools`` package too)."""
    spec = importlib.util.spec_from_file_location(f"fsaf_d2_tools_{name}", tool_path(name))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
