"""``fastrollout.compat.trinity.install()``: the one line that swaps Trinity's coordinator.

Each case runs in a fresh interpreter: patching changes import machinery and Trinity's
modules for the life of a process, as it is meant to.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import trinity.explorer.rollout_coordinator  # noqa: F401  (this environment must have it)

OURS = "fastrollout.compat.trinity.coordinator"


def run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_importing_the_package_imports_neither_ray_nor_trinity():
    assert run("""
        import sys
        import fastrollout.compat.trinity as compat
        from fastrollout.compat.trinity import decode_trxp, encode_trxp
        print(sorted(m for m in ("ray", "trinity", "torch") if m in sys.modules))
    """) == "[]"


def test_patch_before_trinity_is_imported():
    assert run("""
        from fastrollout.compat.trinity import patch
        patch()
        import trinity.explorer.explorer as explorer
        import trinity.explorer.rollout_coordinator as rc
        print(explorer.RolloutCoordinator.__module__, rc.RolloutCoordinator.__module__)
    """) == f"{OURS} {OURS}"


def test_patch_after_trinity_is_imported_and_twice():
    assert run("""
        import trinity.explorer.explorer as explorer
        from fastrollout.compat.trinity import patch
        patch()
        patch()
        import sys
        hooks = [f for f in sys.meta_path if type(f).__name__ == "_PatchOnImport"]
        print(explorer.RolloutCoordinator.__module__, len(hooks))
    """) == f"{OURS} 1"


def test_install_patches_ray_workers_started_later():
    """The Explorer runs in a Ray worker: install() before ray.init reaches it."""
    assert run("""
        import ray
        from fastrollout.compat.trinity import install
        install()
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)

        @ray.remote
        def coordinator_module():
            import trinity.explorer.explorer as explorer
            return explorer.RolloutCoordinator.__module__

        print(ray.get(coordinator_module.remote()))
        ray.shutdown()
    """) == OURS


def test_install_refuses_to_replace_another_setup_hook():
    assert run("""
        import ray
        from fastrollout.compat.trinity import install
        install()
        try:
            ray.init(address="local", runtime_env={"worker_process_setup_hook": "mine.setup"})
        except RuntimeError as exc:
            print("refused" if "mine.setup" in str(exc) else exc)
    """) == "refused"


def test_launcher_is_trinity_command_line_after_install():
    assert run("""
        import sys
        import ray
        from fastrollout.compat.trinity.install import main
        sys.argv = ["fastrollout-trinity", "--help"]
        try:
            main()
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        print(ray.init._fastrollout_hook, "trinity.explorer.rollout_coordinator" in sys.modules
              or any(type(f).__name__ == "_PatchOnImport" for f in sys.meta_path))
    """) == "True True"
