"""GPS: NMEA 0183 from a serial receiver, the current fix, a UTC time hint, and each segment's encrypted track.

Sentences are parsed with pynmea2 (checksums required); GGA gives position, quality, satellites, HDOP and
altitude, RMC gives status (A/V), date and time, speed and course. Sentences of one epoch (same time of
day) are merged into one `GpsFix`. Positions are integer micro-degrees and every other quantity an integer
too (mm, mm/s, centi-degrees, centi-HDOP): records never hold floats. A bad sentence is counted by reason
and skipped; it never ends the reader.

The track of a segment is sensitive (R23): `GpsTrackRecorder.seal()` serialises the segment's points as
JSON Lines and encrypts them to the bureau's recipients in memory; `SealedTrack.write()` puts only the
ciphertext on disk and returns the `Sidecar` (size, SHA-256) for the segment record (docs/FORMAT.md §10.5,
"Sidecars"). The device cannot read its own tracks back. `GpsTrackRecorder.sidecar_provider()` is the
capture pipeline's `sidecar_provider`: it seals and writes the track of each segment just before the
segment is closed, so the segment record names it.

Threads: `GpsReceiver` runs one "gps" thread that owns the port (open, re-open with bounded backoff after
a SerialException, read, parse) and calls `on_fix` on that thread. `GpsTrackRecorder.add` is called from
the gps thread (usually as `on_fix`), `seal`/`sidecar_for` from the capture writer thread; its lock is the
only shared state. `current_fix`, `time_hint`, `stats` may be called from any thread.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import pynmea2
import serial

from agent.evidence.age import Recipient, encrypt_bytes
from agent.evidence.canonical import canonical_bytes, parse_canonical
from agent.evidence.records import SIDECAR_TAGS, Sidecar, sidecar_file_name
from agent.storage.fs import FileSystem

log = logging.getLogger(__name__)

MAX_SENTENCE_BYTES = 128  # NMEA allows 82; anything far beyond is line noise
TRACK_FORMAT = "bwc-gps-track"
TRACK_VERSION = 1
SIDECAR_KIND = "gps_track"
# A track is `<segment_id>.gps.age` in segments/ (records.sidecar_file_name, docs/FORMAT.md §10.5): the
# segment record lists it, and crash recovery adopts it by that name when it closes the segment.
SIDECAR_SUFFIX = f".{SIDECAR_TAGS[SIDECAR_KIND]}.age"


class NmeaValueError(ValueError):
    """A sentence that parsed but carries an impossible value (latitude 95, minutes 61, ...)."""


def _mono_us() -> int:
    return time.monotonic_ns() // 1000


def parse_angle(value: str, hemisphere: str, degree_digits: int) -> int:
    """NMEA `(d)ddmm.mmmm` plus N/S/E/W to signed integer micro-degrees, exactly (half-even rounding)."""
    limit = 90 if degree_digits == 2 else 180
    if hemisphere not in ("NS" if degree_digits == 2 else "EW") or len(hemisphere) != 1:
        raise NmeaValueError(f"bad hemisphere {hemisphere!r}")
    head, _, _ = value.partition(".")
    if len(head) != degree_digits + 2 or not head.isdigit():
        raise NmeaValueError(f"bad angle {value!r}")
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise NmeaValueError(f"bad angle {value!r}") from None
    degrees = int(head[:degree_digits])
    minutes = number - degrees * 100
    if not 0 <= minutes < 60:
        raise NmeaValueError(f"minutes out of range in {value!r}")
    ude = int(((degrees + minutes / 60) * 1_000_000).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    if ude > limit * 1_000_000:
        raise NmeaValueError(f"angle {value!r} beyond {limit} degrees")
    return -ude if hemisphere in "SW" else ude


def _scaled(value: str | None, factor: int) -> int | None:
    """A decimal NMEA field times `factor`, as an integer (None when the field is empty)."""
    if value in (None, ""):
        return None
    try:
        return int((Decimal(value) * factor).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    except InvalidOperation:
        raise NmeaValueError(f"bad number {value!r}") from None


@dataclass(frozen=True)
class GpsFix:
    """One epoch with a position. Integers only; None = the receiver did not say."""

    mono_us: int  # device monotonic time when the epoch's last sentence arrived
    utc_us: int | None  # the receiver's UTC time of the epoch (None until an RMC gave the date)
    lat_ude: int
    lon_ude: int
    alt_mm: int | None
    quality: int  # GGA fix quality: 1 GPS, 2 DGPS, 4 RTK fixed, 5 RTK float, 6 dead reckoning, ...
    sats: int | None
    hdop_centi: int | None
    speed_mmps: int | None
    course_cdeg: int | None


@dataclass(frozen=True)
class GpsTimeHint:
    """UTC from a valid RMC, and the device's monotonic time when it was read (to age it)."""

    utc_us: int
    mono_us: int
    source: str = "gps"


@dataclass
class NmeaStats:
    sentences: int = 0  # lines that were valid NMEA with a good checksum
    used: int = 0  # GGA and RMC sentences taken into fixes
    ignored: int = 0  # valid sentences of other types (GSV, GSA, VTG, ...)
    rejected: Counter[str] = field(default_factory=Counter)  # bad_checksum, unparseable, not_ascii, ...
    fixes: int = 0
    fix_losses: int = 0
    opens: int = 0
    open_failures: int = 0
    line_losses: int = 0
    callback_errors: int = 0

    def copy(self) -> NmeaStats:
        return NmeaStats(self.sentences, self.used, self.ignored, Counter(self.rejected), self.fixes,
                         self.fix_losses, self.opens, self.open_failures, self.line_losses, self.callback_errors)


@dataclass
class _Epoch:
    time_text: str
    started_mono_us: int
    gga: Any = None
    rmc: Any = None


class NmeaDecoder:
    """Bytes in, fixes and time hints out. Not thread-safe: owned by the gps thread (or a test)."""

    def __init__(self, mono_us: Callable[[], int] = _mono_us):
        self._mono_us = mono_us
        self._buf = bytearray()
        self._skipping = False
        self._epoch: _Epoch | None = None
        self._date: dt.date | None = None
        self._last_rmc_time: dt.time | None = None
        self.stats = NmeaStats()
        self.fix: GpsFix | None = None
        self.time_hint: GpsTimeHint | None = None
        self.events: list[GpsFix | None] = []  # new fixes and losses (None) since the caller last drained

    def feed(self, data: bytes) -> None:
        self._buf += data
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_SENTENCE_BYTES:
                    if not self._skipping:
                        self._reject("oversized", bytes(self._buf[:40]))
                    self._skipping = True
                    self._buf.clear()
                return
            line = bytes(self._buf[:nl]).rstrip(b"\r")
            del self._buf[: nl + 1]
            if self._skipping:
                self._skipping = False
                continue
            if line:
                self._sentence(line)

    def flush_stale(self, older_than_us: int = 1_500_000) -> None:
        """Finish an epoch whose partner sentence never came."""
        if self._epoch is not None and self._mono_us() - self._epoch.started_mono_us > older_than_us:
            self._finish_epoch()

    def _reject(self, reason: str, sample: bytes, detail: str = "") -> None:
        self.stats.rejected[reason] += 1
        log.debug("gps: rejected sentence (%s) %s: %r", reason, detail, sample[:40])

    def _sentence(self, line: bytes) -> None:
        if len(line) > MAX_SENTENCE_BYTES:
            self._reject("oversized", line)
            return
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            self._reject("not_ascii", line)
            return
        if not text.isprintable():
            self._reject("not_ascii", line)
            return
        try:
            sentence = pynmea2.parse(text, check=True)
        except pynmea2.ChecksumError as exc:
            self._reject("bad_checksum", line, str(exc))
            return
        except pynmea2.SentenceTypeError:
            self.stats.sentences += 1
            self.stats.ignored += 1
            return
        except (pynmea2.ParseError, ValueError, TypeError, AttributeError) as exc:
            self._reject("unparseable", line, str(exc))
            return
        self.stats.sentences += 1
        kind = getattr(sentence, "sentence_type", "")
        if kind not in ("GGA", "RMC"):
            self.stats.ignored += 1
            return
        time_text = sentence.data[0] if sentence.data else ""
        if self._epoch is not None and self._epoch.time_text != time_text:
            self._finish_epoch()
        if self._epoch is None:
            self._epoch = _Epoch(time_text, self._mono_us())
        if kind == "GGA":
            self._epoch.gga = sentence
        else:
            self._epoch.rmc = sentence
        self.stats.used += 1
        if self._epoch.gga is not None and self._epoch.rmc is not None:
            self._finish_epoch()

    def _finish_epoch(self) -> None:
        epoch, self._epoch = self._epoch, None
        if epoch is None:
            return
        now = self._mono_us()
        try:
            speed_mmps = course_cdeg = None
            rmc_valid: bool | None = None
            if epoch.rmc is not None:
                rmc_valid = self._take_rmc(epoch.rmc, now)
                if rmc_valid:
                    knots = _scaled(epoch.rmc.data[6] if len(epoch.rmc.data) > 6 else None, 1_000_000)
                    # micro-knots -> mm/s, rounded
                    speed_mmps = None if knots is None else (knots * 1852 + 1_800_000) // 3_600_000
                    course_cdeg = _scaled(epoch.rmc.data[7] if len(epoch.rmc.data) > 7 else None, 100)
            if epoch.gga is None:
                if rmc_valid is False:
                    self._set_fix(None)
                return  # position comes from GGA only
            fix = self._fix_from_gga(epoch.gga, now, speed_mmps, course_cdeg)
            self._set_fix(None if fix is None or rmc_valid is False else fix)
        except NmeaValueError as exc:
            self._reject("bad_value", epoch.time_text.encode("ascii", "replace"), str(exc))

    def _take_rmc(self, rmc: Any, now: int) -> bool:
        valid = rmc.data[1] == "A" if len(rmc.data) > 1 else False
        stamp, date = rmc.timestamp, rmc.datestamp
        if isinstance(stamp, dt.time) and isinstance(date, dt.date):
            self._date, self._last_rmc_time = date, stamp
            if valid:
                utc = dt.datetime.combine(date, stamp.replace(tzinfo=dt.UTC))
                self.time_hint = GpsTimeHint(int(utc.timestamp()) * 1_000_000 + utc.microsecond, now)
        return valid

    def _utc_us(self, stamp: Any) -> int | None:
        if not isinstance(stamp, dt.time) or self._date is None:
            return None
        date = self._date
        if self._last_rmc_time is not None and stamp.hour < 12 <= self._last_rmc_time.hour:
            date += dt.timedelta(days=1)  # GGA just after midnight, date from the RMC just before it
        utc = dt.datetime.combine(date, stamp.replace(tzinfo=dt.UTC))
        return int(utc.timestamp()) * 1_000_000 + utc.microsecond

    def _fix_from_gga(self, gga: Any, now: int, speed_mmps: int | None, course_cdeg: int | None) -> GpsFix | None:
        fields = list(gga.data) + [""] * 14
        quality_text = fields[5]
        if not quality_text.isdigit():
            raise NmeaValueError(f"GGA fix quality {quality_text!r}")
        quality = int(quality_text)
        if quality == 0 or not fields[1] or not fields[3]:
            return None
        sats = int(fields[6]) if fields[6].isdigit() else None
        alt_mm = _scaled(fields[8], 1000) if fields[9] in ("M", "") else None
        return GpsFix(mono_us=now, utc_us=self._utc_us(gga.timestamp),
                      lat_ude=parse_angle(fields[1], fields[2], 2), lon_ude=parse_angle(fields[3], fields[4], 3),
                      alt_mm=alt_mm, quality=quality, sats=sats, hdop_centi=_scaled(fields[7], 100),
                      speed_mmps=speed_mmps, course_cdeg=course_cdeg)

    def _set_fix(self, fix: GpsFix | None) -> None:
        if fix is None:
            if self.fix is not None:
                self.stats.fix_losses += 1
                self.events.append(None)
            self.fix = None
            return
        self.stats.fixes += 1
        self.fix = fix
        self.events.append(fix)


class GpsReceiver:
    """Reads a GPS receiver on a serial port; survives unplugging; keeps the current fix and a time hint."""

    def __init__(self, port: str, *, baudrate: int = 9600, on_fix: Callable[[GpsFix | None], None] | None = None,
                 fix_timeout_s: float = 3.0, read_timeout_s: float = 0.1,
                 reopen_backoff_s: tuple[float, float] = (0.2, 5.0),
                 serial_factory: Callable[..., Any] | None = None, mono_us: Callable[[], int] = _mono_us):
        if baudrate not in serial.Serial.BAUDRATES:
            raise ValueError(f"gps baudrate {baudrate} is not a standard rate")
        self.port = port
        self.baudrate = baudrate
        self.on_fix = on_fix
        self.fix_timeout_us = int(fix_timeout_s * 1_000_000)
        self.read_timeout_s = read_timeout_s
        self.reopen_backoff_s = reopen_backoff_s
        self._serial_factory = serial_factory or serial.Serial
        self._mono_us = mono_us
        self._decoder = NmeaDecoder(mono_us)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fix: GpsFix | None = None
        self._hint: GpsTimeHint | None = None
        self._stats = NmeaStats()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("gps receiver already started")
        self._thread = threading.Thread(target=self._run, name="gps", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def current_fix(self) -> GpsFix | None:
        """The latest fix if it is at most `fix_timeout_s` old; None while there is no fix."""
        with self._lock:
            fix = self._fix
        if fix is None or self._mono_us() - fix.mono_us > self.fix_timeout_us:
            return None
        return fix

    def time_hint(self) -> GpsTimeHint | None:
        with self._lock:
            return self._hint

    def stats(self) -> NmeaStats:
        with self._lock:
            return self._stats.copy()

    def wait_for(self, predicate: Callable[[NmeaStats, GpsFix | None], bool], timeout: float) -> bool:
        """Block until `predicate(stats, latest_fix)` holds (re-checked after every read); False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self._stats, self._fix), timeout)

    def _run(self) -> None:
        delay = self.reopen_backoff_s[0]
        while not self._stop.is_set():
            try:
                port = self._serial_factory(self.port, baudrate=self.baudrate, timeout=self.read_timeout_s)
            except (serial.SerialException, OSError, ValueError) as exc:
                self._decoder.stats.open_failures += 1
                self._publish()
                log.log(logging.WARNING if self._decoder.stats.open_failures <= 3 else logging.DEBUG,
                        "gps: cannot open %s: %s (retry in %.2f s)", self.port, exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.reopen_backoff_s[1])
                continue
            delay = self.reopen_backoff_s[0]
            self._decoder.stats.opens += 1
            try:
                while not self._stop.is_set():
                    data = port.read(max(1, port.in_waiting))
                    if data:
                        self._decoder.feed(data)
                    self._decoder.flush_stale()
                    self._publish()
            except (serial.SerialException, OSError) as exc:
                self._decoder.stats.line_losses += 1
                log.warning("gps: line %s lost: %s", self.port, exc)
                self._decoder._set_fix(None)  # no receiver, no fix
                self._publish()
            except Exception:  # a parser surprise must not end GPS for the rest of the shift
                log.exception("gps: reader error; re-opening")
                self._stop.wait(delay)
            finally:
                with contextlib.suppress(Exception):
                    port.close()

    def _publish(self) -> None:
        events, self._decoder.events = self._decoder.events, []
        with self._changed:
            self._fix = self._decoder.fix
            self._hint = self._decoder.time_hint
            self._stats = self._decoder.stats.copy()
            self._changed.notify_all()
        for event in events:
            if self.on_fix is None:
                break
            try:
                self.on_fix(event)
            except Exception:
                self._decoder.stats.callback_errors += 1
                log.exception("gps: on_fix callback raised (ignored)")


# --- the track sidecar --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackPoint:
    mono_us: int
    fix: bool
    utc_us: int | None = None
    lat_ude: int | None = None
    lon_ude: int | None = None
    alt_mm: int | None = None
    quality: int | None = None
    sats: int | None = None
    hdop_centi: int | None = None
    speed_mmps: int | None = None
    course_cdeg: int | None = None

    @classmethod
    def from_fix(cls, fix: GpsFix) -> TrackPoint:
        return cls(fix=True, **asdict(fix))


@dataclass(frozen=True)
class SealedTrack:
    """A segment's track, encrypted. Only `ciphertext` ever reaches the disk."""

    segment_id: str
    points: int
    ciphertext: bytes

    @property
    def file_name(self) -> str:
        return sidecar_file_name(self.segment_id, SIDECAR_KIND)

    def sidecar(self) -> Sidecar:
        return Sidecar(kind=SIDECAR_KIND, file=self.file_name, size=len(self.ciphertext),
                       sha256_cipher=hashlib.sha256(self.ciphertext).hexdigest())

    def write(self, directory: Path, fs: FileSystem | None = None) -> Sidecar:
        """Write the ciphertext durably (new file, fsynced, renamed from .part, directory fsynced)."""
        fs = fs or FileSystem()
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / self.file_name
        part = directory / (self.file_name + ".part")
        fh = fs.create(part)
        try:
            fh.write(self.ciphertext)
            fs.sync(fh)
        finally:
            fh.close()
        fs.rename_new(part, final)
        fs.sync_dir(directory)
        return self.sidecar()


class GpsTrackRecorder:
    """Keeps recent points (fixes and losses of fix) and seals a segment's points by media timestamp.

    Points are routed by their monotonic time, the clock the media timestamps use, so a segment gets the
    points of its own time span, including the pre-event part. A fix carries the time its receiver read
    it; a loss of fix is stamped with `mono_us`, which must be that same clock (the receiver's and the
    media's: `Clock.mono_us`). Memory is bounded: points older than `retention_s` or beyond `max_points`
    are dropped, oldest first, and counted in `dropped_points`.
    """

    def __init__(self, *, retention_s: float = 900.0, max_points: int = 36_000,
                 mono_us: Callable[[], int] = _mono_us):
        self._mono_us = mono_us
        self.retention_us = int(retention_s * 1_000_000)
        self._points: deque[TrackPoint] = deque()
        self._max_points = max_points
        self._lock = threading.Lock()
        self.dropped_points = 0

    def add(self, fix: GpsFix | None, mono_us: int | None = None) -> None:
        """Record a fix, or (None) the loss of fix at `mono_us` (now if not given). Usable as `on_fix`."""
        at = self._mono_us() if mono_us is None else mono_us
        point = TrackPoint.from_fix(fix) if fix is not None else TrackPoint(mono_us=at, fix=False)
        with self._lock:
            self._points.append(point)
            horizon = point.mono_us - self.retention_us
            while self._points and (len(self._points) > self._max_points or self._points[0].mono_us < horizon):
                self._points.popleft()
                self.dropped_points += 1

    def points_between(self, from_mono_us: int, to_mono_us: int) -> list[TrackPoint]:
        with self._lock:
            return [p for p in self._points if from_mono_us <= p.mono_us < to_mono_us]

    def seal(self, segment_id: str, from_mono_us: int, to_mono_us: int,
             recipients: Iterable[Recipient]) -> SealedTrack:
        """Encrypt the points in [from_mono_us, to_mono_us) for the bureau; the plaintext stays in memory."""
        points = self.points_between(from_mono_us, to_mono_us)
        plaintext = serialise_track(segment_id, from_mono_us, to_mono_us, points)
        return SealedTrack(segment_id, len(points), encrypt_bytes(plaintext, list(recipients)))

    def sidecar_for(self, segment_id: str, first_pts_us: int, end_pts_us: int, segments_dir: Path,
                    recipients: Iterable[Recipient], fs: FileSystem | None = None) -> list[dict[str, Any]]:
        """Seal and durably write the track of a segment spanning [first_pts_us, end_pts_us) on the media
        clock; returns its `sidecars` entry as a one-item list, or [] (nothing written) if no point falls
        in that span. Raises OSError/FileExistsError if the file cannot be written (an existing sidecar is
        never replaced). Cost: encrypting a few KB and two fsyncs, on the caller's thread."""
        with self._lock:
            if not any(first_pts_us <= p.mono_us < end_pts_us for p in self._points):
                return []
        sealed = self.seal(segment_id, first_pts_us, end_pts_us, recipients)
        return [sealed.write(Path(segments_dir), fs).model_dump()]

    def sidecar_provider(self, segments_dir: Path, recipients: Iterable[Recipient],
                         fs: FileSystem | None = None) -> Callable[[str, int, int], list[dict[str, Any]]]:
        """`sidecar_for` bound to a store's `segments/` and recipients: the capture pipeline's
        `sidecar_provider` (`CapturePipeline(..., sidecar_provider=track.sidecar_provider(store.segments_dir,
        store.recipients, store.fs))`)."""
        bound = list(recipients)

        def provide(segment_id: str, first_pts_us: int, end_pts_us: int) -> list[dict[str, Any]]:
            return self.sidecar_for(segment_id, first_pts_us, end_pts_us, segments_dir, bound, fs)

        return provide


def serialise_track(segment_id: str, from_mono_us: int, to_mono_us: int, points: list[TrackPoint]) -> bytes:
    """JSON Lines: a header object, then one object per point; each line canonical JSON (RFC 8785)."""
    header = {"format": TRACK_FORMAT, "v": TRACK_VERSION, "segment_id": segment_id,
              "from_mono_us": from_mono_us, "to_mono_us": to_mono_us, "points": len(points)}
    lines = [canonical_bytes(header)] + [canonical_bytes(asdict(p)) for p in points]
    return b"\n".join(lines) + b"\n"


def parse_track(plaintext: bytes) -> tuple[dict[str, Any], list[TrackPoint]]:
    """The inverse of `serialise_track` (for the bureau and tests). Raises ValueError naming the problem."""
    lines = plaintext.split(b"\n")
    if lines[-1] != b"" or len(lines) < 2:
        raise ValueError("track must be newline-terminated JSON Lines with a header")
    header = parse_canonical(lines[0])
    if not isinstance(header, dict) or header.get("format") != TRACK_FORMAT or header.get("v") != TRACK_VERSION:
        raise ValueError(f"not a {TRACK_FORMAT} v{TRACK_VERSION} header: {lines[0][:80]!r}")
    try:
        points = [TrackPoint(**parse_canonical(line)) for line in lines[1:-1]]
    except TypeError as exc:
        raise ValueError(f"bad track point: {exc}") from None
    if len(points) != header["points"]:
        raise ValueError(f"header says {header['points']} points, file has {len(points)}")
    return header, points
