"""Offline data: the episode store, its sampler, the TD-MPC2 dataset importer, the rollout
collector (`agent.data.collect`, imports dm_control) and the teacher-target cache.
CLI: `python -m agent.data --help`."""
from agent.data.sampler import SampleIndex, Sampler, gather_windows
from agent.data.store import EpisodeStore, EpisodeStoreWriter, StoreError, StoreManifest, write_store
from agent.data.tdmpc2_import import ChunkError, UntrustedPickleError, import_tdmpc2
from agent.data.teacher_cache import PcaLatents, TeacherCache, TeacherFunctions, world_model_teacher

__all__ = [
    "EpisodeStore", "EpisodeStoreWriter", "StoreError", "StoreManifest", "write_store",
    "Sampler", "SampleIndex", "gather_windows",
    "ChunkError", "UntrustedPickleError", "import_tdmpc2",
    "PcaLatents", "TeacherCache", "TeacherFunctions", "world_model_teacher",
]
