/**
 * Exponential backoff with jitter, for resending messages and for reconnecting: the same curve
 * as the Rust SDK. 500 ms first, doubling, capped at 60 s, each delay randomised by ±30 % so
 * that many clients that lost the same server do not come back in lockstep.
 */

export interface RetryPolicy {
  initial_ms: number;
  factor: number;
  max_ms: number;
  /** Each delay is multiplied by a random factor in `1 ± jitter`. */
  jitter: number;
  /** Attempts (the first send included) before a message fails; `null` retries for ever. */
  max_attempts: number | null;
}

export function defaultRetryPolicy(): RetryPolicy {
  return { initial_ms: 500, factor: 2, max_ms: 60_000, jitter: 0.3, max_attempts: 10 };
}

/** The reconnect policy: the same curve, never giving up. */
export function reconnectPolicy(): RetryPolicy {
  return { ...defaultRetryPolicy(), max_attempts: null };
}

/**
 * The delay before attempt `attempt + 1`, after `attempt` attempts (1-based), given a uniform
 * random number `unit` in `[0, 1)`.
 */
export function delayMs(p: RetryPolicy, attempt: number, unit: number): number {
  const exp = Math.min(Math.max(attempt - 1, 0), 64);
  const base = Math.min(p.initial_ms * Math.pow(p.factor, exp), p.max_ms);
  const u = Math.min(Math.max(unit, 0), 1);
  const spread = 1 + p.jitter * (2 * u - 1);
  return Math.round(Math.max(base * spread, 0));
}

/** Whether another attempt is allowed after `attempt` attempts. */
export function mayRetry(p: RetryPolicy, attempt: number): boolean {
  return p.max_attempts === null || attempt < p.max_attempts;
}
