/** Reading the outbox for people: a correlation's effects, each with every try of it. */
import type { Selectable } from 'kysely';
import type { Executor } from './events.ts';
import type { EffectAttemptsTable, EffectsTable } from './schema.ts';

export type EffectWithTries = Selectable<EffectsTable> & { tries: Selectable<EffectAttemptsTable>[] };

/** Every effect of a correlation (a VM's id covers its partition's cycle too) in creation order, tries in order. */
export async function readEffectsWithTries(db: Executor, correlationId: string): Promise<EffectWithTries[]> {
  const effects = await db.selectFrom('effects').selectAll().where('correlation_id', '=', correlationId).orderBy('created_at').orderBy('id').execute();
  if (effects.length === 0) return [];
  const attempts = await db
    .selectFrom('effect_attempts')
    .selectAll()
    .where(
      'effect_id',
      'in',
      effects.map((e) => e.id),
    )
    .orderBy('effect_id')
    .orderBy('attempt')
    .execute();
  const triesOf = new Map<string, Selectable<EffectAttemptsTable>[]>();
  for (const a of attempts) triesOf.set(a.effect_id, [...(triesOf.get(a.effect_id) ?? []), a]);
  return effects.map((e) => ({ ...e, tries: triesOf.get(e.id) ?? [] }));
}
