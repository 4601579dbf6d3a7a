"""A test double of pyACL, CANN's Python runtime (``import acl``), written from its documentation:
only what nasq calls to see whether an NPU is there, ``acl.init()`` -> ret, ``acl.rt.get_device_count()``
-> (count, ret) and ``acl.finalize()`` -> ret (0 is success). It counts the NPUs the process may see as
the ais_bench double does: ``ASCEND_DOUBLE_NPUS`` devices on the "machine" (default 8), of which
``ASCEND_RT_VISIBLE_DEVICES`` (when set) leaves those it names.
"""
import os


def init(config_path=None):
    return 0


def finalize():
    return 0


class rt:  # noqa: N801  (pyACL's name)
    @staticmethod
    def get_device_count():
        total = int(os.environ.get("ASCEND_DOUBLE_NPUS", "8"))
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
        if visible is None:
            return total, 0
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        return sum(1 for v in ids if v.isdigit() and int(v) < total), 0
