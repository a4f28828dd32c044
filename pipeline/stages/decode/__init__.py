"""Decode: candidate frames of one video, sampled by time, resized to a square.

`decode_video` probes the file, picks target times and returns the frame shown at each target time
as uint8 (T, S, S, 3), upright, with its time, its ordinal and the video's metadata. `DecodeStage`
runs it per row in an isolated child process (see `pipeline.stages.decode.isolation`) with a timeout, retries,
and a second backend, and writes an error row instead of raising.

Rules, and why:
- Sampling is by time, never by frame index: variable-frame-rate files are common. `uniform` puts
  `num_frames` targets at the centres of equal segments of [0, duration); `fps` puts one target
  every 1/fps s from 0, evenly thinned to at most `max_frames`. Times are seconds from the video
  stream's start. A target gets the frame whose presentation interval [pts, next pts) contains it
  (the first frame for targets before it). Several targets landing on one frame yield it once, so
  a video with fewer frames than targets returns every frame it has; >= 1 frame is a success.
- Decode only what sampling needs: the PyAV reader seeks (to the keyframe before the target) when a
  keyframe lies between the current position and the next target, or, when the file has no full
  index, when the target is more than `pyav_backend._SEEK_GAP_S` ahead; otherwise it decodes forward. Only the
  chosen frames are converted to RGB.
- `seek: keyframe` trades timing for cost: each target gets the keyframe nearest it (the earlier on
  a tie), each keyframe once, decoded right after a seek to it and nothing else decoded. Keyframe
  times come from the container's full index (MP4/MOV, AVI), else from a demux-only scan of the
  packets (which also gives where the data ends, so cut files fail with the same reasons as in
  `exact`); decord uses its own key-frame index. Times and ordinals are the decoded keyframes'.
- Frame index = ordinal of the frame in the stream. Exact when PyAV decodes from the start, or
  lands after a seek on a keyframe of a fully indexed file (MP4/MOV, AVI: the keyframe's position
  in the index, exact for closed GOPs); decord indexes every frame. Otherwise (a seek in MKV/WebM)
  estimated as round((t - t_first) * fps), kept strictly increasing (approximate for VFR files).
- One probe, done with PyAV, gives the metadata for both backends (decord 0.6.0 exposes neither the
  codec, nor the rotation, nor which stream it reads). Video stream: the one FFmpeg's
  av_find_best_stream picks (default disposition, then most frames seen while probing, then bit
  rate), which is also what decord reads; cover-art pictures are never chosen. Duration: the
  stream's, else the container's, else from the packets' timestamps (no decode).
- Rotation: PyAV returns frames as stored and reports the display matrix; decord rotates itself.
  Both end up upright. `rotation` is the clockwise angle (0/90/180/270) applied to the stored frame
  to display it (the old `rotate` tag, exiftool's "Rotation"); width/height are the display size
  (rotation applied, sample aspect ratio not). Frames are resized to S x S without keeping the
  aspect ratio, as SigLIP/CLIP image processors do.
- AVI stores no presentation timestamps; FFmpeg derives them and, for packed B-frames (XviD/DivX,
  e.g. UCF101), returns them permuted. AVI frame times therefore come from the decode timestamps,
  which are monotonic. Elsewhere a missing or non-increasing pts is repaired as previous + 1/fps.
- Limits are applied before work: the file size before reading, the frame size from the header
  before decoding any frame, the duration right after the probe.
- Backends: `pyav` streams from fsspec file objects; `decord` needs a local path (remote files are
  downloaded to a temporary file, bounded by max_bytes), one thread for VP9/VP8, and a container
  duration. `auto` is PyAV first, then decord: as fast or faster on the test videos (faster for
  sparse sampling of long files) and it opens every one of them; see `stage.AUTO_ORDER`.
  `nvdec` decodes on the GPU (PyNvVideoCodec): frame times and keyframes from a demux-only pass
  over the packets, the same picking rule, only the picked frames decoded, scaled on the GPU; what
  it cannot take is `unsupported`, and PyAV follows.

Errors are `DecodeError(reason, detail)` with an `ErrorReason` (pipeline/errors.py); an error row
gets them as `error_reason` and `error_detail`.

Modules, one job each: `sampling` (target times, frame picking), `source` (local or fsspec bytes,
storage failures), `container` (opening, diagnosing unopenable and cut-short files), `backend`
(the `Backend` protocol and the values it passes), `pyav_backend`, `decord_backend`, `nvdec_backend`, `errors`
(`DecodeError`), and `stage` (`decode_video`, `DecodeStage` and its retry/fallback policy).
"""

from pipeline.errors import ErrorReason
from pipeline.stages.decode.backend import VideoInfo
from pipeline.stages.decode.errors import DecodeError
from pipeline.stages.decode.stage import DecodedVideo, DecodeStage, decode_video

__all__ = ["DecodeError", "DecodeStage", "DecodedVideo", "ErrorReason", "VideoInfo", "decode_video"]
