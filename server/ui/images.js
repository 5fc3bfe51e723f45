// Reading image files in the browser, and the server's output-size arithmetic (SPEC part B).

const SENDABLE = new Set(["image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp"]);

export function blobToDataUri(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

/** The EXIF orientation of a JPEG (1 = as stored), read from its APP1 segment. */
export function jpegOrientation(buffer) {
  try {
    const v = new DataView(buffer);
    if (v.getUint16(0) !== 0xffd8) return 1;
    let offset = 2;
    while (offset + 4 <= v.byteLength) {
      const marker = v.getUint16(offset);
      if ((marker & 0xff00) !== 0xff00 || marker === 0xffda) return 1;
      const length = v.getUint16(offset + 2);
      if (marker === 0xffe1 && v.getUint32(offset + 4) === 0x45786966) {
        const tiff = offset + 10;
        const little = v.getUint16(tiff) === 0x4949;
        const ifd = tiff + v.getUint32(tiff + 4, little);
        const count = v.getUint16(ifd, little);
        for (let i = 0; i < count; i++) {
          const entry = ifd + 2 + i * 12;
          if (v.getUint16(entry, little) === 0x0112) return v.getUint16(entry + 8, little);
        }
        return 1;
      }
      offset += 2 + length;
    }
  } catch { /* truncated or odd file: treat as unrotated */ }
  return 1;
}

/**
 * Decode an image file and decide what to send: the file's own bytes when the server will see
 * the same pixels as the page, else a PNG of what the page shows (EXIF-rotated JPEGs, whose
 * stored size differs from the shown one, and formats the server may not read).
 */
export async function readImage(blob) {
  const bitmap = await createImageBitmap(blob);
  let send = blob;
  let reencoded = false;
  const rotated = blob.type === "image/jpeg" && jpegOrientation(await blob.arrayBuffer()) > 1;
  if (rotated || !SENDABLE.has(blob.type)) {
    const canvas = document.createElement("canvas");
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
    canvas.getContext("2d").drawImage(bitmap, 0, 0);
    send = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    reencoded = true;
  }
  return { bitmap, dataUri: await blobToDataUri(send), reencoded, bytes: send.size };
}

/** Load an image string (data: URI or URL) as a Blob; null when it is not an image. */
export async function fetchImage(src) {
  const res = await fetch(src);
  if (!res.ok) throw new Error(`could not fetch the image (${res.status})`);
  const blob = await res.blob();
  if (!blob.type.startsWith("image/")) return null;
  return blob;
}

// inference/sizing.py's TARGET_PIXELS, MATCH_INPUT_MAX_SIDE and MULTIPLE (tests/test_ui_contract.py
// checks that they agree).
const TARGETS = { "1": 1024 * 1024, "0.25": 512 * 512 };
const MATCH_INPUT_MAX_SIDE = 1440;
const MULTIPLE = 32;

/** The size the server generates at for an image of w×h (SPEC part B, "Output size"). */
export function outputSize(w, h, megapixels) {
  let width = w;
  let height = h;
  if (megapixels in TARGETS) {
    const s = Math.sqrt(TARGETS[megapixels] / (w * h));
    width = Math.trunc(w * s);
    height = Math.trunc(h * s);
  } else if (w > MATCH_INPUT_MAX_SIDE || h > MATCH_INPUT_MAX_SIDE) {
    const s = Math.min(MATCH_INPUT_MAX_SIDE / w, MATCH_INPUT_MAX_SIDE / h);
    width = Math.trunc(w * s);
    height = Math.trunc(h * s);
  }
  return { width: width - (width % MULTIPLE), height: height - (height % MULTIPLE) };
}
