"""Where the tests find their real videos.

SHARED_VIDEOS: the shared corpus beside the checkout (../shared/testdata/videos), or the directory
named by MOREF_TEST_VIDEOS. DEMO_VIDEOS: the Apache-2.0 samples bundled with the project.
"""

import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_VIDEOS = pathlib.Path(os.environ.get("MOREF_TEST_VIDEOS", REPO.parent / "shared" / "testdata" / "videos"))
DEMO_VIDEOS = REPO / "jobs" / "demo" / "videos"
