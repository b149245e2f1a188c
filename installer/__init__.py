"""The installer behind install.py: the engine's venv, the Krita and GIMP 3 plug-ins, the weights.

Standard library only: it runs with the system python3 before the engine's venv exists (Python
3.10+). `python -m engine doctor` asks it where the plug-ins went and which GPUs it finds.

    cli          the options and the main flow
    console      what it says, the commands it runs, InstallError
    layout       the per-OS user folders of Krita and GIMP 3 (and kritarc)
    files        listing, copying and removing files and folders safely
    plugins      the plug-ins and the shared client into each host's folder; manifest; uninstall
    pyzmq        each host's Python and the pyzmq wheel it needs
    kritarc      enabling the Krita plug-in in kritarc, and undoing exactly that
    torch_build  which torch build drives the machine's GPU
    venv         the engine's venv: torch and the project
    weights      the models (--models, --list-models, --remove-model), through the engine venv
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout install.py runs from
