# Text in many scripts on purpose: their look-alike letters and punctuation are the point.
# ruff: noqa: RUF001
"""Realistic good teacher replies in several languages and scripts, written for these tests.

Each ``Case`` is one seed row (chunk, outline, domain, in-context example) and the replies a
good teacher gives for every stage: two summaries, questions on the chunk with their answers,
key facts with context, and question/answer pairs on the first fact. The quality gates must
pass every one of them untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.seeds import SeedRow, doc_id_for


@dataclass(frozen=True)
class Case:
    language: str
    document: str
    outline: str
    domain: str
    icl_document: str
    icl_queries: tuple[str, str, str]
    summaries: tuple[str, str]
    questions: tuple[str, ...]
    answers: tuple[str, ...]  # one per question
    facts: tuple[tuple[str, str], ...]  # (fact, context)
    pairs: tuple[tuple[str, str], ...]  # about the first fact

    def seed(self) -> SeedRow:
        return SeedRow(
            doc_id=doc_id_for(self.document),
            line_no=1,
            document=self.document,
            document_outline=self.outline,
            domain=self.domain,
            icl_document=self.icl_document,
            icl_query_1=self.icl_queries[0],
            icl_query_2=self.icl_queries[1],
            icl_query_3=self.icl_queries[2],
        )


ENGLISH = Case(
    language="English",
    document=(
        "The Danube is Europe's second-longest river after the Volga. It rises in the Black "
        "Forest in Germany and flows for about 2,850 km to the Black Sea, passing through or "
        "along ten countries, more than any other river in the world. Four capital cities lie "
        "on its banks: Vienna, Bratislava, Budapest and Belgrade. Since 1948 the Belgrade "
        "Convention has guaranteed free navigation on the river, which links the North Sea "
        "to the Black Sea through the Rhine-Main-Danube Canal, opened in 1992."
    ),
    outline="European Geography: The Danube",
    domain="geography",
    icl_document=(
        "The Thames flows for 346 km through southern England. It passes through Oxford and "
        "London before reaching the North Sea at the Thames Estuary."
    ),
    icl_queries=(
        "How long is the Thames?",
        "Which cities does the Thames pass through?",
        "Where does the Thames meet the sea?",
    ),
    summaries=(
        "The Danube, Europe's second-longest river, rises in Germany's Black Forest and flows "
        "about 2,850 km to the Black Sea through or along ten countries. Vienna, Bratislava, "
        "Budapest and Belgrade lie on its banks.",
        "Second only to the Volga in Europe, the Danube runs some 2,850 km from the Black Forest "
        "to the Black Sea and touches ten countries, a world record. It flows past four "
        "capitals. Free navigation has been guaranteed by the Belgrade Convention since 1948, "
        "and since 1992 the Rhine-Main-Danube Canal connects it with the North Sea.",
    ),
    questions=(
        "Where does the Danube rise, and where does it end?",
        "Which four capital cities lie on the Danube?",
        "Since when has navigation on the Danube been free, and under which agreement?",
    ),
    answers=(
        "The Danube rises in the Black Forest in Germany and ends in the Black Sea.",
        "Vienna, Bratislava, Budapest and Belgrade.",
        "Since 1948, under the Belgrade Convention.",
    ),
    facts=(
        (
            "The Danube flows through or along ten countries, more than any other river.",
            "It rises in the Black Forest in Germany and flows for about 2,850 km to the "
            "Black Sea, passing through or along ten countries.",
        ),
        (
            "The Rhine-Main-Danube Canal, opened in 1992, links the North Sea to the Black Sea.",
            "The river links the North Sea to the Black Sea through the Rhine-Main-Danube Canal, "
            "opened in 1992.",
        ),
    ),
    pairs=(
        (
            "How many countries does the Danube flow through or along?",
            "Ten, which is more than any other river in the world.",
        ),
        ("Which river crosses or borders the most countries?", "The Danube, with ten countries."),
    ),
)

GERMAN = Case(
    language="German",
    document=(
        "Der Rhein entspringt in den Schweizer Alpen und mündet nach rund 1.230 Kilometern in "
        "den Niederlanden in die Nordsee. Er durchfließt den Bodensee und bildet auf langen "
        "Strecken die Grenze zwischen Deutschland und Frankreich. Der Mittelrhein zwischen "
        "Bingen und Koblenz gehört seit 2002 zum UNESCO-Welterbe. Mit mehr als 100 Millionen "
        "Tonnen Gütern im Jahr ist der Rhein eine der meistbefahrenen Wasserstraßen der Welt."
    ),
    outline="Geographie Europas: Der Rhein",
    domain="Geographie",
    icl_document=(
        "Die Elbe fließt aus dem Riesengebirge in Tschechien über Dresden und Hamburg in die "
        "Nordsee. Sie ist etwa 1.094 Kilometer lang."
    ),
    icl_queries=(
        "Wo entspringt die Elbe?",
        "Welche Städte liegen an der Elbe?",
        "Wie lang ist die Elbe?",
    ),
    summaries=(
        "Der Rhein entspringt in den Schweizer Alpen und mündet nach rund 1.230 Kilometern in "
        "die Nordsee; er bildet lange die Grenze zwischen Deutschland und Frankreich.",
        "Von den Schweizer Alpen bis zur Nordsee in den Niederlanden legt der Rhein etwa 1.230 "
        "Kilometer zurück, durchquert den Bodensee und trennt streckenweise Deutschland von "
        "Frankreich. Das Tal des Mittelrheins ist seit 2002 UNESCO-Welterbe, und mit über 100 "
        "Millionen Tonnen Fracht im Jahr zählt der Fluss zu den wichtigsten Wasserstraßen.",
    ),
    questions=(
        "Wo entspringt der Rhein und wo mündet er?",
        "Seit wann gehört der Mittelrhein zum UNESCO-Welterbe?",
        "Wie viele Tonnen Güter werden jährlich auf dem Rhein transportiert?",
    ),
    answers=(
        "Der Rhein entspringt in den Schweizer Alpen und mündet in den Niederlanden in die "
        "Nordsee.",
        "Der Abschnitt zwischen Bingen und Koblenz ist seit 2002 UNESCO-Welterbe.",
        "Mehr als 100 Millionen Tonnen im Jahr.",
    ),
    facts=(
        (
            "Der Rhein ist rund 1.230 Kilometer lang.",
            "Der Rhein entspringt in den Schweizer Alpen und mündet nach rund 1.230 Kilometern "
            "in den Niederlanden in die Nordsee.",
        ),
    ),
    pairs=(
        ("Wie lang ist der Rhein?", "Rund 1.230 Kilometer."),
        (
            "Welcher Fluss legt von den Schweizer Alpen bis zur Nordsee etwa 1.230 Kilometer "
            "zurück?",
            "Der Rhein.",
        ),
    ),
)

FRENCH = Case(
    language="French",
    document=(
        "La Loire est le plus long fleuve de France : elle parcourt environ 1 000 kilomètres "
        "depuis le mont Gerbier-de-Jonc, dans le Massif central, jusqu'à l'océan Atlantique, "
        "près de Saint-Nazaire. Son cours, souvent qualifié de dernier fleuve sauvage "
        "d'Europe, est sujet à de fortes crues. Le Val de Loire, entre Sully-sur-Loire et "
        "Chalonnes, est inscrit au patrimoine mondial de l'UNESCO depuis 2000 pour ses châteaux "
        "de la Renaissance, dont Chambord et Amboise."
    ),
    outline="Géographie de la France : la Loire",
    domain="géographie",
    icl_document=(
        "La Seine prend sa source sur le plateau de Langres et traverse Paris avant de se "
        "jeter dans la Manche au Havre."
    ),
    icl_queries=(
        "Où la Seine prend-elle sa source ?",
        "Quelle grande ville la Seine traverse-t-elle ?",
        "Où la Seine se jette-t-elle ?",
    ),
    summaries=(
        "La Loire, plus long fleuve de France, parcourt environ 1 000 kilomètres du mont "
        "Gerbier-de-Jonc à l'Atlantique. Le Val de Loire est classé à l'UNESCO depuis 2000.",
        "Longue d'environ 1 000 kilomètres, la Loire naît au mont Gerbier-de-Jonc dans le "
        "Massif central et se jette dans l'Atlantique près de Saint-Nazaire. Réputée pour ses "
        "crues, on la dit dernier fleuve sauvage d'Europe. Ses châteaux de la Renaissance, "
        "comme Chambord et Amboise, ont valu au Val de Loire son inscription à l'UNESCO en 2000.",
    ),
    questions=(
        "Où la Loire prend-elle sa source ?",
        "Pourquoi le Val de Loire est-il inscrit au patrimoine mondial de l'UNESCO ?",
        "Quelle est la longueur de la Loire ?",
    ),
    answers=(
        "Au mont Gerbier-de-Jonc, dans le Massif central.",
        "Pour ses châteaux de la Renaissance, dont Chambord et Amboise ; il est inscrit "
        "depuis 2000.",
        "Environ 1 000 kilomètres.",
    ),
    facts=(
        (
            "La Loire se jette dans l'océan Atlantique près de Saint-Nazaire.",
            "Elle parcourt environ 1 000 kilomètres depuis le mont Gerbier-de-Jonc jusqu'à "
            "l'océan Atlantique, près de Saint-Nazaire.",
        ),
    ),
    pairs=(
        ("Où la Loire se jette-t-elle ?", "Dans l'océan Atlantique, près de Saint-Nazaire."),
        (
            "Quel fleuve français atteint l'Atlantique près de Saint-Nazaire ?",
            "La Loire.",
        ),
    ),
)

CHINESE = Case(
    language="Chinese",
    document=(
        "长江是中国最长的河流，全长约6300公里，仅次于尼罗河和亚马孙河，位居世界第三。"
        "长江发源于青藏高原的唐古拉山脉，自西向东流经青海、西藏、四川、重庆、湖北、湖南、"
        "江西、安徽、江苏和上海等省区市，最终在上海注入东海。三峡大坝位于湖北省宜昌市，"
        "于2006年建成，是世界上装机容量最大的水电站。"
    ),
    outline="中国地理：长江",
    domain="地理",
    icl_document="黄河全长约5464公里，是中国第二长河，发源于青海省巴颜喀拉山脉，注入渤海。",
    icl_queries=("黄河有多长？", "黄河发源于哪里？", "黄河最终注入哪个海？"),
    summaries=(
        "长江全长约6300公里，是中国最长、世界第三长的河流，发源于唐古拉山脉，在上海注入东海。",
        "长江发源于青藏高原的唐古拉山脉，自西向东流经多个省区市，全长约6300公里，"
        "在上海注入东海，长度仅次于尼罗河和亚马孙河。位于宜昌的三峡大坝于2006年建成，"
        "是世界上装机容量最大的水电站。",
    ),
    questions=("长江全长多少公里？", "长江发源于哪里？", "三峡大坝位于哪里，何时建成？"),
    answers=(
        "长江全长约6300公里。",
        "长江发源于青藏高原的唐古拉山脉。",
        "三峡大坝位于湖北省宜昌市，于2006年建成。",
    ),
    facts=(
        (
            "三峡大坝是世界上装机容量最大的水电站。",
            "三峡大坝位于湖北省宜昌市，于2006年建成，是世界上装机容量最大的水电站。",
        ),
    ),
    pairs=(
        ("世界上装机容量最大的水电站是哪一座？", "是位于湖北省宜昌市的三峡大坝。"),
        ("三峡大坝有什么世界之最？", "它是世界上装机容量最大的水电站。"),
    ),
)

JAPANESE = Case(
    language="Japanese",
    document=(
        "富士山は静岡県と山梨県にまたがる活火山で、標高は3776メートルと日本で最も高い。"
        "最後の噴火は1707年の宝永噴火である。山頂付近は夏の短い期間だけ登山が可能で、"
        "毎年およそ20万人が登頂を目指す。2013年には「富士山－信仰の対象と芸術の源泉」として"
        "ユネスコの世界文化遺産に登録された。"
    ),
    outline="日本の地理：富士山",
    domain="地理",
    icl_document="阿蘇山は熊本県にある活火山で、世界最大級のカルデラを持つ。",
    icl_queries=(
        "阿蘇山はどこにありますか？",
        "阿蘇山の特徴は何ですか？",
        "阿蘇山は活火山ですか？",
    ),
    summaries=(
        "富士山は標高3776メートルの日本最高峰の活火山で、最後の噴火は1707年の宝永噴火である。",
        "静岡県と山梨県にまたがる富士山は標高3776メートルで日本一高い活火山であり、"
        "1707年に最後の噴火を起こした。夏の短い期間に毎年約20万人が登頂を目指し、"
        "2013年には信仰と芸術の源泉として世界文化遺産に登録された。",
    ),
    questions=(
        "富士山の標高は何メートルですか？",
        "富士山が最後に噴火したのはいつですか？",
        "富士山が世界文化遺産に登録されたのは何年ですか？",
    ),
    answers=(
        "富士山の標高は3776メートルで、日本で最も高い山です。",
        "1707年の宝永噴火が最後の噴火です。",
        "2013年に登録されました。",
    ),
    facts=(
        (
            "富士山には毎年およそ20万人が登頂を目指す。",
            "山頂付近は夏の短い期間だけ登山が可能で、毎年およそ20万人が登頂を目指す。",
        ),
    ),
    pairs=(
        ("毎年何人くらいが富士山の登頂を目指しますか？", "およそ20万人です。"),
        ("富士山に登れるのはいつですか？", "山頂付近に登れるのは夏の短い期間だけです。"),
    ),
)

ARABIC = Case(
    language="Arabic",
    document=(
        "نهر النيل هو أطول نهر في أفريقيا، ويبلغ طوله نحو 6650 كيلومترًا. يتكون من رافدين "
        "رئيسيين: النيل الأبيض الذي ينبع من منطقة البحيرات العظمى، والنيل الأزرق الذي ينبع من "
        "بحيرة تانا في إثيوبيا. يلتقي الرافدان في الخرطوم عاصمة السودان، ثم يجري النهر شمالًا "
        "عبر مصر حتى يصب في البحر الأبيض المتوسط. وقد اكتمل بناء السد العالي في أسوان عام 1970."
    ),
    outline="جغرافيا أفريقيا: نهر النيل",
    domain="الجغرافيا",
    icl_document="نهر الفرات ينبع من تركيا ويمر عبر سوريا والعراق قبل أن يلتقي بنهر دجلة.",
    icl_queries=(
        "من أين ينبع نهر الفرات؟",
        "ما الدول التي يمر بها نهر الفرات؟",
        "بأي نهر يلتقي الفرات؟",
    ),
    summaries=(
        "النيل أطول أنهار أفريقيا بطول 6650 كيلومترًا تقريبًا، ويلتقي رافداه الأبيض والأزرق في "
        "الخرطوم قبل أن يصب في البحر الأبيض المتوسط.",
        "يمتد نهر النيل نحو 6650 كيلومترًا، وهو أطول أنهار أفريقيا. ينبع النيل الأبيض من "
        "منطقة البحيرات العظمى والنيل الأزرق من بحيرة تانا في إثيوبيا، ويلتقيان في الخرطوم. "
        "بعد ذلك يتجه النهر شمالًا عبر مصر إلى البحر الأبيض المتوسط، واكتمل السد العالي في "
        "أسوان عام 1970.",
    ),
    questions=(
        "ما طول نهر النيل؟",
        "أين يلتقي النيل الأبيض بالنيل الأزرق؟",
        "متى اكتمل بناء السد العالي في أسوان؟",
    ),
    answers=(
        "يبلغ طول نهر النيل نحو 6650 كيلومترًا.",
        "يلتقيان في الخرطوم عاصمة السودان.",
        "اكتمل بناؤه عام 1970.",
    ),
    facts=(
        (
            "ينبع النيل الأزرق من بحيرة تانا في إثيوبيا.",
            "يتكون النيل من رافدين رئيسيين: النيل الأبيض الذي ينبع من منطقة البحيرات العظمى، "
            "والنيل الأزرق الذي ينبع من بحيرة تانا في إثيوبيا.",
        ),
    ),
    pairs=(
        ("من أين ينبع النيل الأزرق؟", "ينبع من بحيرة تانا في إثيوبيا."),
        ("أي رافد للنيل ينبع من بحيرة تانا؟", "النيل الأزرق."),
    ),
)

RUSSIAN = Case(
    language="Russian",
    document=(
        "Байкал — самое глубокое озеро на Земле: его максимальная глубина составляет 1642 метра. "
        "Озеро расположено в Восточной Сибири и содержит около 20 процентов мировых запасов "
        "пресной поверхностной воды. Возраст Байкала оценивается в 25–35 миллионов лет, что "
        "делает его одним из древнейших озёр планеты. В 1996 году Байкал был включён в список "
        "объектов Всемирного наследия ЮНЕСКО."
    ),
    outline="География России: озеро Байкал",
    domain="география",
    icl_document="Ладожское озеро — крупнейшее пресноводное озеро Европы, оно находится в Карелии.",
    icl_queries=(
        "Какое озеро крупнейшее в Европе?",
        "Где находится Ладожское озеро?",
        "Какая вода в Ладожском озере?",
    ),
    summaries=(
        "Байкал — самое глубокое (1642 метра) и одно из древнейших озёр Земли; в нём около 20 "
        "процентов мировой пресной поверхностной воды.",
        "Озеро Байкал в Восточной Сибири достигает глубины 1642 метра, больше любого другого "
        "озера, и хранит около пятой части мировых запасов пресной поверхностной воды. Ему "
        "25–35 миллионов лет, и с 1996 года оно входит в список Всемирного наследия ЮНЕСКО.",
    ),
    questions=(
        "Какова максимальная глубина Байкала?",
        "Какую долю мировых запасов пресной поверхностной воды содержит Байкал?",
        "Когда Байкал был включён в список Всемирного наследия ЮНЕСКО?",
    ),
    answers=(
        "Максимальная глубина Байкала составляет 1642 метра.",
        "Около 20 процентов.",
        "В 1996 году.",
    ),
    facts=(
        (
            "Возраст Байкала оценивается в 25–35 миллионов лет.",
            "Возраст Байкала оценивается в 25–35 миллионов лет, что делает его одним из "
            "древнейших озёр планеты.",
        ),
    ),
    pairs=(
        ("Сколько лет озеру Байкал?", "Его возраст оценивается в 25–35 миллионов лет."),
        (
            "Почему Байкал называют одним из древнейших озёр планеты?",
            "Потому что его возраст составляет 25–35 миллионов лет.",
        ),
    ),
)

HINDI = Case(
    language="Hindi",
    document=(
        "गंगा नदी भारत की सबसे पवित्र और सबसे महत्वपूर्ण नदियों में से एक है। यह उत्तराखंड में "
        "गंगोत्री हिमनद से निकलती है और लगभग 2525 किलोमीटर बहकर बंगाल की खाड़ी में गिरती है। "
        "इसके किनारे हरिद्वार, प्रयागराज, वाराणसी और पटना जैसे बड़े शहर बसे हैं। गंगा और "
        "ब्रह्मपुत्र मिलकर दुनिया का सबसे बड़ा डेल्टा, सुंदरबन डेल्टा, बनाती हैं।"
    ),
    outline="भारत का भूगोल: गंगा नदी",
    domain="भूगोल",
    icl_document="यमुना नदी यमुनोत्री हिमनद से निकलती है और प्रयागराज में गंगा से मिलती है।",
    icl_queries=(
        "यमुना नदी कहाँ से निकलती है?",
        "यमुना गंगा से कहाँ मिलती है?",
        "यमुना किस हिमनद से निकलती है?",
    ),
    summaries=(
        "गंगा गंगोत्री हिमनद से निकलकर लगभग 2525 किलोमीटर बहती है और बंगाल की खाड़ी में गिरती है।",
        "उत्तराखंड के गंगोत्री हिमनद से निकलने वाली गंगा लगभग 2525 किलोमीटर की यात्रा करके "
        "बंगाल की खाड़ी में मिलती है। हरिद्वार, प्रयागराज, वाराणसी और पटना इसके किनारे बसे हैं, "
        "और ब्रह्मपुत्र के साथ मिलकर यह दुनिया का सबसे बड़ा डेल्टा बनाती है।",
    ),
    questions=(
        "गंगा नदी कहाँ से निकलती है?",
        "गंगा नदी की लंबाई कितनी है?",
        "गंगा और ब्रह्मपुत्र मिलकर कौन सा डेल्टा बनाती हैं?",
    ),
    answers=(
        "गंगा उत्तराखंड में गंगोत्री हिमनद से निकलती है।",
        "लगभग 2525 किलोमीटर।",
        "वे मिलकर सुंदरबन डेल्टा बनाती हैं, जो दुनिया का सबसे बड़ा डेल्टा है।",
    ),
    facts=(
        (
            "गंगा बंगाल की खाड़ी में गिरती है।",
            "यह उत्तराखंड में गंगोत्री हिमनद से निकलती है और लगभग 2525 किलोमीटर बहकर बंगाल की "
            "खाड़ी में गिरती है।",
        ),
    ),
    pairs=(
        ("गंगा नदी किस सागर में गिरती है?", "गंगा बंगाल की खाड़ी में गिरती है।"),
        ("बंगाल की खाड़ी में कौन सी पवित्र नदी गिरती है?", "गंगा नदी।"),
    ),
)

CASES: tuple[Case, ...] = (ENGLISH, GERMAN, FRENCH, CHINESE, JAPANESE, ARABIC, RUSSIAN, HINDI)
