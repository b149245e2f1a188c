"""Qt for the plug-in: PyQt5 (Krita 5) or PyQt6 (Krita 6), whichever Krita itself loaded.

Every other module imports Qt names from here, so a move to Qt 6 touches one file. The binding
Krita already imported wins: a system Python may have both, and loading Qt 6 into a Qt 5 Krita
would crash it. Enums are used in their scoped form (`Qt.AlignmentFlag.AlignTop`), which PyQt6
requires and PyQt5 5.11+ accepts.
"""

from __future__ import annotations

import sys


def _binding() -> str:
    for name in ("PyQt6", "PyQt5"):
        if name in sys.modules:
            return name
    try:
        import PyQt5  # noqa: F401  (Krita 5, most installs)

        return "PyQt5"
    except ImportError:
        return "PyQt6"


if _binding() == "PyQt6":
    from PyQt6.QtCore import QObject, QSize, Qt, QTimer
    from PyQt6.QtGui import QAction, QIcon, QImage, QKeySequence, QPixmap
    from PyQt6.QtWidgets import (
        QCheckBox,
        QComboBox,
        QDoubleSpinBox,
        QFormLayout,
        QHBoxLayout,
        QLabel,
        QLineEdit,
        QPlainTextEdit,
        QProgressBar,
        QPushButton,
        QSpinBox,
        QToolButton,
        QVBoxLayout,
        QWidget,
    )

    QT_VERSION = 6
else:
    from PyQt5.QtCore import QObject, QSize, Qt, QTimer
    from PyQt5.QtGui import QIcon, QImage, QKeySequence, QPixmap
    from PyQt5.QtWidgets import (
        QAction,
        QCheckBox,
        QComboBox,
        QDoubleSpinBox,
        QFormLayout,
        QHBoxLayout,
        QLabel,
        QLineEdit,
        QPlainTextEdit,
        QProgressBar,
        QPushButton,
        QSpinBox,
        QToolButton,
        QVBoxLayout,
        QWidget,
    )

    QT_VERSION = 5

__all__ = [
    "QT_VERSION",
    "QAction",
    "QIcon",
    "QImage",
    "QPixmap",
    "QSize",
    "QToolButton",
    "QCheckBox",
    "QComboBox",
    "QDoubleSpinBox",
    "QFormLayout",
    "QHBoxLayout",
    "QKeySequence",
    "QLabel",
    "QLineEdit",
    "QObject",
    "QPlainTextEdit",
    "QProgressBar",
    "QPushButton",
    "QSpinBox",
    "QTimer",
    "QVBoxLayout",
    "QWidget",
    "Qt",
]
