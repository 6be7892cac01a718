"""What kind of file a person sent, decided the same way for every platform.

Telegram says "document" and Discord says "attachment" for anything from a PDF to a zip;
parley needs to know which of its four `MediaKind`s a file is before it fetches a byte
(an image goes to the model, a voice note is transcribed, a document's text is read,
anything else gets one line saying what parley can read). Both connectors classify
through `classify`, so a file is the same kind whichever platform it came from, and the
size messages below read the same everywhere.
"""

from __future__ import annotations

import mimetypes

from bots.media import MediaKind, MediaTooLarge

# Archives parley never opens (kind "other", what "archive").
_ARCHIVES = frozenset(
    {
        "application/zip", "application/x-zip-compressed", "application/x-tar", "application/gzip",
        "application/x-gzip", "application/x-7z-compressed", "application/x-rar-compressed", "application/vnd.rar",
        "application/x-bzip2", "application/x-xz", "application/zstd", "application/java-archive",
    }
)  # fmt: skip
# Programs and disk images: nothing in them is for a model to read.
_PROGRAMS = frozenset(
    {
        "application/x-msdownload", "application/x-msdos-program", "application/x-executable",
        "application/x-sharedlib", "application/vnd.android.package-archive", "application/x-apple-diskimage",
        "application/x-iso9660-image",
    }
)  # fmt: skip
# Types that say nothing: the file name is a better guide.
_VAGUE = frozenset({"application/octet-stream", "binary/octet-stream", "application/unknown"})
_EXTRA_TYPES = {".tgs": "application/x-tgsticker", ".oga": "audio/ogg", ".opus": "audio/ogg", ".md": "text/markdown"}


def bare_mime(mime: str | None) -> str | None:
    """`mime` lower-cased and without parameters (Discord sends "text/plain; charset=utf-8")."""
    if not mime:
        return None
    bare = mime.split(";", 1)[0].strip().lower()
    return bare or None


def guess_mime(name: str | None) -> str | None:
    """The MIME type a file name suggests, or None."""
    if not name or "." not in name:
        return None
    suffix = name[name.rfind(".") :].lower()
    if suffix in _EXTRA_TYPES:
        return _EXTRA_TYPES[suffix]
    guessed, _ = mimetypes.guess_type(name, strict=False)
    return bare_mime(guessed)


def classify(mime: str | None, name: str | None) -> tuple[MediaKind, str | None, str | None]:
    """(kind, what, mime) for a file the platform reported as `mime` named `name`.

    `mime` comes back bare (see `bare_mime`), guessed from the name when the platform
    gave none or a vague one. Images are "image" except SVG (XML text: a "document");
    audio is "audio"; video, archives and programs are "other" with `what` naming them;
    everything else is a "document" whose text the model side may or may not read.
    """
    bare = bare_mime(mime)
    if bare is None or bare in _VAGUE:
        bare = guess_mime(name) or bare
    if bare is None:
        return "document", None, None
    if bare.startswith("image/") and bare != "image/svg+xml":
        return "image", None, bare
    if bare.startswith("audio/"):
        return "audio", None, bare
    if bare.startswith("video/"):
        return "other", "video", bare
    if bare in _ARCHIVES:
        return "other", "archive", bare
    if bare in _PROGRAMS:
        return "other", "program", bare
    return "document", None, bare


def megabytes(size: int) -> str:
    """A byte count as people say it: "20 MB", "1.5 MB", "300 KB"."""
    if size >= 1024 * 1024:
        value = size / (1024 * 1024)
        return f"{value:.0f} MB" if value >= 10 or value == int(value) else f"{value:.1f} MB"
    return f"{max(1, round(size / 1024))} KB"


def too_large(size: int | None, limit: int) -> MediaTooLarge:
    """The one line for a file over parley's limit (`size` None: found out while reading)."""
    if size is None:
        return MediaTooLarge(f"the file is larger than the {megabytes(limit)} parley accepts")
    return MediaTooLarge(f"the file is {megabytes(size)}; parley accepts files up to {megabytes(limit)}")
