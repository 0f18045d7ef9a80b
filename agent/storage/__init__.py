"""The device's evidence store: encrypted segment files, the signed ledger, the SQLite index,
keys, space accounting and crash recovery. Nothing here can delete or edit footage or records,
except purging a segment whose bureau receipt has been verified (itself a ledger record)."""
