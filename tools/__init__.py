"""The command-line programs of fsaf_d2.

In the repository they run as ``python tools/<name>.py ...``; an installed fsaf_d2 ships them as the
package ``fsaf_d2.tools`` behind the console scripts ``fsaf-benchmark``, ``fsaf-benchmark-data``,
``fsaf-demo``, ``fsaf-export`` and ``fsaf-convert-mmdet`` (see setup.py). The code they reuse lives in the
``fsaf_d2`` package; a program does not import another one.
"""
