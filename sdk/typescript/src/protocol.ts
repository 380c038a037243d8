/**
 * The wire protocol's frames, as `docs/protocol.md` in the Ordo repository specifies them
 * (version 1), in JSON text frames.
 *
 * Frames a client sends are written exactly as the server reads them (optional fields left out
 * when absent); frames the server sends are read with the same defaults the server's own
 * definitions use (a missing `has_more` is `false`, missing `members` is empty), so that an
 * older or newer server is understood.
 */

import { sha256 } from './sha256.js';

/** One message of a conversation, as `msg` pushes it and `synced` pages carry it. */
export interface Message {
  conv: string;
  seq: number;
  /** Sending user; empty for a system message (a backend post, a membership event). */
  from: string;
  /** Sending device; empty for messages posted through the admin API. */
  device: string;
  /** The sender's client message id (for an event, an id the server made, starting with `#`). */
  cmid: string;
  body: string;
  reply_to?: number;
  /** When the server accepted it, in milliseconds since the Unix epoch (server clock). */
  ts: number;
  /** Set on a system message that records a change of the group. */
  event?: ConvEvent;
}

/** A change of a group, recorded as a message at its place in the history. */
export type ConvEvent =
  | { kind: 'joined'; users: string[] }
  | { kind: 'left'; users: string[] }
  | { kind: 'removed'; users: string[] }
  | { kind: 'renamed'; name: string };

export interface Position {
  conv: string;
  seq: number;
}

/** A frame the client sends. */
export type ClientFrame =
  | { type: 'send'; conv?: string; to?: string; cmid: string; body: string; reply_to?: number }
  | { type: 'ack'; acks: Position[] }
  | { type: 'read'; conv: string; seq: number }
  | { type: 'sync'; conv: string; after: number; limit?: number }
  | { type: 'convs'; after?: string; limit?: number }
  | { type: 'ping'; nonce?: number };

export interface Limits {
  max_frame_bytes: number;
  max_body_bytes: number;
  max_sync_limit: number;
  max_acks_per_frame: number;
}

export interface MemberPosition {
  user: string;
  delivered: number;
  read: number;
}

/** One conversation of the overview (`convs`). */
export interface ConvInfo {
  conv: string;
  kind: 'direct' | 'group';
  epoch: number;
  max_seq: number;
  first_seq: number;
  /** This device's delivered position. */
  delivered: number;
  /** This user's read position. */
  read: number;
  member_count: number;
  others_delivered: number;
  others_read: number;
  /** Empty for groups too large to list their members (the aggregates above are all). */
  members: MemberPosition[];
  name?: string;
}

/** A frame the server sends. */
export type ServerFrame =
  | { type: 'welcome'; user: string; device: string; protocol: number; server_time: number; limits: Limits }
  | { type: 'accepted'; cmid: string; conv: string; seq: number; ts: number }
  | {
      type: 'rejected';
      cmid: string;
      code: string;
      message: string;
      retryable: boolean;
      retry_after_ms?: number;
    }
  | ({ type: 'msg' } & Message)
  | { type: 'notify'; conv: string; max_seq: number }
  | {
      type: 'synced';
      conv: string;
      epoch: number;
      messages: Message[];
      has_more: boolean;
      first_seq: number;
      max_seq: number;
    }
  | { type: 'receipt'; conv: string; user: string; delivered: number; read: number }
  | { type: 'convs'; conversations: ConvInfo[]; has_more: boolean }
  | { type: 'error'; code: string; message: string; request?: string; conv?: string }
  | { type: 'pong'; nonce?: number; server_time: number };

/** Why a server frame could not be read. */
export class FrameError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'FrameError';
  }
}

type Json = Record<string, unknown>;

function str(o: Json, k: string, where: string): string {
  const v = o[k];
  if (typeof v !== 'string') throw new FrameError(`${where}: field "${k}" must be a string`);
  return v;
}

function num(o: Json, k: string, where: string): number {
  const v = o[k];
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) {
    throw new FrameError(`${where}: field "${k}" must be an unsigned integer`);
  }
  return v;
}

function optNum(o: Json, k: string, where: string): number | undefined {
  return o[k] === undefined || o[k] === null ? undefined : num(o, k, where);
}

function optStr(o: Json, k: string, where: string): string | undefined {
  return o[k] === undefined || o[k] === null ? undefined : str(o, k, where);
}

function bool(o: Json, k: string, where: string, dflt?: boolean): boolean {
  const v = o[k];
  if (v === undefined && dflt !== undefined) return dflt;
  if (typeof v !== 'boolean') throw new FrameError(`${where}: field "${k}" must be a boolean`);
  return v;
}

function obj(v: unknown, where: string): Json {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) {
    throw new FrameError(`${where} must be an object`);
  }
  return v as Json;
}

function arr(o: Json, k: string, where: string, dflt?: unknown[]): unknown[] {
  const v = o[k];
  if (v === undefined && dflt !== undefined) return dflt;
  if (!Array.isArray(v)) throw new FrameError(`${where}: field "${k}" must be an array`);
  return v;
}

function strings(o: Json, k: string, where: string): string[] {
  return arr(o, k, where).map((u) => {
    if (typeof u !== 'string') throw new FrameError(`${where}: "${k}" must hold strings`);
    return u;
  });
}

function convEvent(v: unknown): ConvEvent {
  const o = obj(v, 'event');
  const kind = str(o, 'kind', 'event');
  switch (kind) {
    case 'joined':
    case 'left':
    case 'removed':
      return { kind, users: strings(o, 'users', 'event') };
    case 'renamed':
      return { kind, name: str(o, 'name', 'event') };
    default:
      throw new FrameError(`event: unknown kind "${kind}"`);
  }
}

/** Reads one message object (of `msg`, or of a `synced` page). */
export function readMessage(v: unknown): Message {
  const o = obj(v, 'message');
  const m: Message = {
    conv: str(o, 'conv', 'message'),
    seq: num(o, 'seq', 'message'),
    from: str(o, 'from', 'message'),
    device: str(o, 'device', 'message'),
    cmid: str(o, 'cmid', 'message'),
    body: str(o, 'body', 'message'),
    ts: num(o, 'ts', 'message'),
  };
  const replyTo = optNum(o, 'reply_to', 'message');
  if (replyTo !== undefined) m.reply_to = replyTo;
  if (o.event !== undefined && o.event !== null) m.event = convEvent(o.event);
  return m;
}

function readConvInfo(v: unknown): ConvInfo {
  const w = 'convs entry';
  const o = obj(v, w);
  const kind = str(o, 'kind', w);
  if (kind !== 'direct' && kind !== 'group') throw new FrameError(`${w}: unknown kind "${kind}"`);
  const info: ConvInfo = {
    conv: str(o, 'conv', w),
    kind,
    epoch: num(o, 'epoch', w),
    max_seq: num(o, 'max_seq', w),
    first_seq: num(o, 'first_seq', w),
    delivered: num(o, 'delivered', w),
    read: num(o, 'read', w),
    member_count: optNum(o, 'member_count', w) ?? 0,
    others_delivered: optNum(o, 'others_delivered', w) ?? 0,
    others_read: optNum(o, 'others_read', w) ?? 0,
    members: arr(o, 'members', w, []).map((m) => {
      const p = obj(m, 'member');
      return {
        user: str(p, 'user', 'member'),
        delivered: num(p, 'delivered', 'member'),
        read: num(p, 'read', 'member'),
      };
    }),
  };
  const name = optStr(o, 'name', w);
  if (name !== undefined) info.name = name;
  return info;
}

/** Reads a server frame from the parsed JSON of one text message. */
export function readServerFrame(v: unknown): ServerFrame {
  const o = obj(v, 'frame');
  const type = str(o, 'type', 'frame');
  const w = `"${type}" frame`;
  switch (type) {
    case 'welcome': {
      const l = obj(o.limits ?? {}, 'limits');
      return {
        type,
        user: str(o, 'user', w),
        device: str(o, 'device', w),
        protocol: num(o, 'protocol', w),
        server_time: num(o, 'server_time', w),
        limits: {
          max_frame_bytes: optNum(l, 'max_frame_bytes', 'limits') ?? 0,
          max_body_bytes: optNum(l, 'max_body_bytes', 'limits') ?? 0,
          max_sync_limit: optNum(l, 'max_sync_limit', 'limits') ?? 0,
          max_acks_per_frame: optNum(l, 'max_acks_per_frame', 'limits') ?? 0,
        },
      };
    }
    case 'accepted':
      return {
        type,
        cmid: str(o, 'cmid', w),
        conv: str(o, 'conv', w),
        seq: num(o, 'seq', w),
        ts: num(o, 'ts', w),
      };
    case 'rejected': {
      const f: ServerFrame = {
        type,
        cmid: str(o, 'cmid', w),
        code: str(o, 'code', w),
        message: str(o, 'message', w),
        retryable: bool(o, 'retryable', w),
      };
      const after = optNum(o, 'retry_after_ms', w);
      if (after !== undefined) f.retry_after_ms = after;
      return f;
    }
    case 'msg':
      return { type, ...readMessage(o) };
    case 'notify':
      return { type, conv: str(o, 'conv', w), max_seq: num(o, 'max_seq', w) };
    case 'synced':
      return {
        type,
        conv: str(o, 'conv', w),
        epoch: num(o, 'epoch', w),
        messages: arr(o, 'messages', w).map(readMessage),
        has_more: bool(o, 'has_more', w),
        first_seq: num(o, 'first_seq', w),
        max_seq: num(o, 'max_seq', w),
      };
    case 'receipt':
      return {
        type,
        conv: str(o, 'conv', w),
        user: str(o, 'user', w),
        delivered: num(o, 'delivered', w),
        read: num(o, 'read', w),
      };
    case 'convs':
      return {
        type,
        conversations: arr(o, 'conversations', w).map(readConvInfo),
        has_more: bool(o, 'has_more', w, false),
      };
    case 'error': {
      const f: ServerFrame = { type, code: str(o, 'code', w), message: str(o, 'message', w) };
      const request = optStr(o, 'request', w);
      const conv = optStr(o, 'conv', w);
      if (request !== undefined) f.request = request;
      if (conv !== undefined) f.conv = conv;
      return f;
    }
    case 'pong': {
      const f: ServerFrame = { type, server_time: num(o, 'server_time', w) };
      const nonce = optNum(o, 'nonce', w);
      if (nonce !== undefined) f.nonce = nonce;
      return f;
    }
    default:
      throw new FrameError(`unknown frame type "${type}"`);
  }
}

/** Parses and reads one JSON text frame from the server. */
export function decodeServerFrame(text: string): ServerFrame {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new FrameError(`not JSON: ${(e as Error).message}`);
  }
  return readServerFrame(v);
}

/** Encodes a client frame as JSON text, `type` first (the server decodes it in one pass). */
export function encodeClientFrame(f: ClientFrame): string {
  return JSON.stringify(f);
}

/**
 * The id of the direct conversation between users `a` and `b`, as the server names it: `d_`
 * and the first 16 bytes, in hex, of SHA-256 over the two ids in byte order, each preceded by
 * its length in bytes as a 32-bit big-endian integer.
 */
export async function directConvId(a: string, b: string): Promise<string> {
  const enc = new TextEncoder();
  const [x, y] = a <= b ? [enc.encode(a), enc.encode(b)] : [enc.encode(b), enc.encode(a)];
  const data = new Uint8Array(8 + x.length + y.length);
  const view = new DataView(data.buffer);
  view.setUint32(0, x.length);
  data.set(x, 4);
  view.setUint32(4 + x.length, y.length);
  data.set(y, 8 + x.length);
  const subtle = globalThis.crypto?.subtle;
  const digest =
    subtle === undefined ? sha256(data) : new Uint8Array(await subtle.digest('SHA-256', data));
  let hex = '';
  for (const byte of digest.subarray(0, 16)) hex += byte.toString(16).padStart(2, '0');
  return `d_${hex}`;
}
