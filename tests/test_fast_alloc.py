"""The opt-in allocator tuning: explicit, reported, and harmless where it does not apply."""
import platform

from baffle import _alloc


def test_tune_malloc_is_opt_in_and_reports_what_it_set():
    import baffle.client  # noqa: F401 - importing the library must not tune the allocator

    if _alloc.malloc_settings() is not None:  # another test in this process already tuned it
        assert _alloc.tune_malloc()
        return
    applied = _alloc.tune_malloc(trim_threshold=1 << 28)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied and _alloc.malloc_settings() == {"trim_threshold": 1 << 28,
                                                        "mmap_threshold": _alloc.MMAP_THRESHOLD}
    else:
        assert not applied and _alloc.malloc_settings() is None
